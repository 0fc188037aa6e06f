"""Kernel tests run the Triton kernels on the GPU when there is one, else under triton's interpreter.

TRITON_INTERPRET must be set before the kernels are decorated, i.e. before
duo_vllm.kernels.triton_kernels is imported (triton 3.9 reads knobs.runtime.interpret at @triton.jit
time; importing triton itself earlier is fine). duo_vllm.kernels never imports it eagerly.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tk():
    """The Triton kernel module (interpreted on CPU); skips when triton is missing."""
    pytest.importorskip("triton")
    from duo_vllm.kernels import triton_kernels

    if not torch.cuda.is_available():
        assert triton_kernels._interpreting(), "triton_kernels was imported before TRITON_INTERPRET was set"
    return triton_kernels
