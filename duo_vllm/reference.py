"""Offline reference of the dual-sparse model in plain transformers: what the served model must reproduce.

The pruned weights load as ordinary dense tensors; each decoder linear gets a forward pre-hook that
applies its input threshold, on every token (prefill and decode alike).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from duo_vllm.format import (
    apply_threshold,
    causal_lm_class,
    check_weights,
    load_thresholds,
    read_config,
    read_hf_config,
)


def attach_thresholds(model: nn.Module, thresholds: dict[tuple[int, str], float]) -> list:
    """Sparsify the input of each listed decoder linear of a LLaMA-layout model; returns the hook handles."""
    handles = []
    layers = model.model.layers
    for (layer_idx, linear), t in thresholds.items():
        module = layers[layer_idx].get_submodule(linear)
        t32 = float(torch.tensor(t, dtype=torch.float32))  # the checkpoint's fp32 value

        def hook(_module, args, t32=t32):
            return (apply_threshold(args[0], t32),) + tuple(args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    return handles


def load_reference_model(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A duo checkpoint as its transformers model (e.g. LlamaForCausalLM) with its activation thresholds applied."""
    read_config(ckpt_dir)  # refuses anything that is not a duo checkpoint
    config = read_hf_config(ckpt_dir)
    check_weights(ckpt_dir, config)
    model = causal_lm_class(config, str(Path(ckpt_dir) / "config.json")).from_pretrained(
        str(ckpt_dir), dtype=dtype, use_safetensors=True)
    model.eval()
    attach_thresholds(model, load_thresholds(ckpt_dir))
    return model
