"""Dual-sparse linear kernels: the bitmap weight format, Triton kernels and the ``duo`` torch op.

The vLLM plugin uses three names:
  packed = pack_weight(weight)                       # process_weights_after_loading, after TP sharding
  y = dual_sparse_linear(x, threshold, packed, bias)  # apply()
  ok, why = can_serve(weight.shape, weight.dtype, weight.device)  # before packing: can Triton serve it?
Importing this package never imports triton; the Triton module is loaded on first CUDA use.
"""
from duo_vllm.kernels.dispatch import can_serve, choose_path, dual_sparse_linear, load_table
from duo_vllm.kernels.packing import (
    channel_bytes,
    dense_bytes,
    format_bytes,
    pack_weight,
    resident_bytes,
    unpack_weight,
)

__all__ = [
    "can_serve",
    "channel_bytes",
    "choose_path",
    "dense_bytes",
    "dual_sparse_linear",
    "format_bytes",
    "load_table",
    "pack_weight",
    "resident_bytes",
    "unpack_weight",
]
