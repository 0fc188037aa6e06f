"""The dual-sparse linear on plain torch, as the custom op ``torch.ops.duo.threshold_linear``.

vLLM traces linear methods with torch.compile(fullgraph=True); an opaque op with a fake
implementation keeps the thresholding out of the graph and free of host syncs. This is the
CPU path, and the CUDA fallback when the Triton kernels (``duo_vllm.kernels``) are unavailable.
"""
from __future__ import annotations

import torch

from duo_vllm.format import apply_threshold

# Ops live as long as their library object: keep it at module level.
_LIB = torch.library.Library("duo", "FRAGMENT")
_LIB.define("threshold_linear(Tensor x, Tensor threshold, Tensor weight, Tensor? bias=None) -> Tensor")


def _threshold_linear(
    x: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.nn.functional.linear(apply_threshold(x, threshold), weight, bias)


def _threshold_linear_fake(
    x: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIB.impl("threshold_linear", _threshold_linear, "CompositeExplicitAutograd")
torch.library.register_fake("duo::threshold_linear", _threshold_linear_fake, lib=_LIB)


def threshold_linear(
    x: torch.Tensor, threshold: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``linear(x * (|x| > threshold), weight, bias)``; threshold is a 0-dim tensor of x's dtype."""
    return torch.ops.duo.threshold_linear(x, threshold, weight, bias)
