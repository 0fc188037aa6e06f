"""The kernel seam of the duo linear method: which kernel serves a layer, and why the others don't.

Every kernel says whether it can serve a layer (``can_implement(spec) -> (ok, reason)``), builds its
own runtime layout from the loaded weight (``process_weights_after_loading``, after tensor-parallel
sharding; it frees what it does not keep, so a layer's weight is resident once per layout it needs) and
computes ``linear(x * (|x| > t), W) + bias`` (``apply``). Each is one op in the ``duo`` namespace, or
vLLM's own GEMM:

  triton  CUDA, bf16/fp16: the bitmap kernels of ``duo_vllm.kernels`` (torch.ops.duo.dual_sparse_linear)
  cpu     CPU, fp32: the C++ dual-sparse kernel (torch.ops.duo.cpu_sparse_linear); above a measured
          batch size, the thresholded x through vLLM's oneDNN GEMM, inside the same op
  torch   anywhere: the thresholded x through the GEMM vLLM's dense model uses (the reference path)

``choose_kernel`` takes the first of that list that can serve the layer, or the one named by
``DUO_KERNEL=triton|cpu|torch`` (tests, benchmarks; a kernel that cannot serve is an error, never a
silent fallback). The choice is logged once per distinct outcome, i.e. once per model.
"""
from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import vllm._custom_ops as vllm_ops
from torch.nn import Parameter
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm, dispatch_unquantized_gemm
from vllm.platforms import current_platform

from duo_vllm import kernels
from duo_vllm.format import apply_threshold
from duo_vllm.kernels import cpu_kernel

logger = logging.getLogger("vllm.duo")

KERNEL_ENV = "DUO_KERNEL"


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel needs to know to say whether it can serve a layer (shapes after TP sharding)."""

    prefix: str
    out_features: int
    in_features: int
    dtype: torch.dtype
    device: torch.device


def _free_weight(layer: torch.nn.Module) -> None:
    """Drop the loaded dense weight once a kernel holds its own layout (vLLM's dense CPU path does the same)."""
    layer.weight = Parameter(torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device),
                             requires_grad=False)


class DuoLinearKernel(ABC):
    """One way to compute a duo linear; one instance per layer."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        """(True, None), or (False, why this kernel cannot serve the layer)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Build the runtime layout from layer.weight (dense with zeros) and layer.input_threshold (0-dim)."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """linear(x * (|x| > t), W) + bias."""


class TorchKernel(DuoLinearKernel):
    """The thresholded x through vLLM's dense GEMM for this platform (oneDNN on CPU, cuBLAS on CUDA)."""

    name = "torch"

    def __init__(self) -> None:
        self.gemm = dispatch_unquantized_gemm()  # the platform's dense GEMM, as vLLM's dense layers call it

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if current_platform.is_cpu():
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.gemm(layer, apply_threshold(x, layer.input_threshold), layer.weight, bias)


class CpuSparseKernel(DuoLinearKernel):
    """The C++ dual-sparse kernel (``duo_vllm/kernels/cpu_kernel.cpp``), fp32 on CPU."""

    name = "cpu"

    def __init__(self) -> None:
        self.packed = None
        self.dense_gemm = None  # vLLM's oneDNN handler, kept alive here: it frees its weight when collected
        self.max_sparse_m = 0

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.device.type != "cpu":
            return False, f"device is {spec.device.type}, not cpu"
        if spec.dtype != torch.float32:
            return False, f"dtype is {spec.dtype}; the CPU kernel is float32 only"
        if not vllm_ops._supports_onednn:
            return False, "this vLLM build has no oneDNN GEMM (the kernel's path above the crossover)"
        try:
            cpu_kernel.ensure_loaded()
            cpu_kernel.isa()  # refuses a DUO_CPU_ISA this CPU lacks
        except cpu_kernel.CpuKernelUnavailable as e:
            return False, str(e)
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight.data
        self.packed = cpu_kernel.pack(weight)
        self.max_sparse_m, source = cpu_kernel.max_sparse_m(*weight.shape, self.packed.weight_density,
                                                                  self.packed.isa)
        self.dense_gemm = vllm_ops.create_onednn_mm(weight.t(), 32)
        logger.debug("duo: %s [%d x %d]: cpu kernel (%s) up to M = %d (%s)", layer.prefix, *weight.shape,
                     self.packed.isa, self.max_sparse_m, source)
        _free_weight(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_kernel.sparse_linear(x, layer.input_threshold, self.packed, bias,
                                        self.dense_gemm.handler_tensor, self.max_sparse_m)


class TritonKernel(DuoLinearKernel):
    """The Triton bitmap kernels (``duo_vllm/kernels``), bf16/fp16 on CUDA."""

    name = "triton"

    def __init__(self) -> None:
        self.packed = None

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        if spec.device.type != "cuda":
            return False, f"device is {spec.device.type}, not cuda"
        return kernels.can_serve((spec.out_features, spec.in_features), spec.dtype, spec.device)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self.packed = kernels.pack_weight(layer.weight.data)  # keeps no gemm copy: the weight is resident once
        _free_weight(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.dual_sparse_linear(x, layer.input_threshold, self.packed, bias)


KERNELS: tuple[type[DuoLinearKernel], ...] = (TritonKernel, CpuSparseKernel, TorchKernel)
KERNEL_NAMES = tuple(k.name for k in KERNELS)

_logged: set[tuple] = set()


def choose_kernel(spec: LayerSpec, requested: str | None = None) -> DuoLinearKernel:
    """The kernel that serves this layer: ``requested`` (default: $DUO_KERNEL) or the first that can."""
    requested = os.environ.get(KERNEL_ENV) or None if requested is None else requested
    if requested is not None and requested not in KERNEL_NAMES:
        raise ValueError(f"{KERNEL_ENV}={requested!r}: unknown kernel, expected one of {', '.join(KERNEL_NAMES)}")
    refused: list[str] = []
    for kernel in KERNELS:
        if requested is not None and kernel.name != requested:
            continue
        ok, reason = kernel.can_implement(spec)
        if ok:
            key = (kernel.name, requested, tuple(refused))
            if key not in _logged:
                _logged.add(key)
                how = f"{KERNEL_ENV}={requested}" if requested else "first that can serve"
                logger.info("duo: kernel %r serves %s-%s linears (%s)%s", kernel.name, spec.device.type,
                            str(spec.dtype).removeprefix("torch."), how,
                            "; refused: " + "; ".join(refused) if refused else "")
            return kernel()
        if requested is not None:
            raise RuntimeError(f"{KERNEL_ENV}={requested}: kernel {requested!r} cannot serve {spec.prefix} "
                               f"[{spec.out_features} x {spec.in_features}, {spec.dtype}, {spec.device}]: {reason}")
        refused.append(f"{kernel.name}: {reason}")
    raise AssertionError("the torch kernel serves every layer")  # unreachable: TorchKernel always can
