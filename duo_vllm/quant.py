"""The ``duo`` quantization method for vLLM: pruned weights times thresholded activations.

Every decoder linear (fused qkv, o, fused gate_up, down) loads its dense-with-zeros weight and one
fp32 ``input_threshold`` per checkpoint linear, and computes ``linear(x * (|x| > t), W)`` on every
token with the kernel ``duo_vllm.linear_kernels.choose_kernel`` picks for it. Embeddings and lm_head
stay unquantized.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch.nn import Parameter
from vllm.distributed import get_tp_group
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding
from vllm.model_executor.parameter import ModelWeightParameter, PerTensorScaleParameter
from vllm.model_executor.utils import set_weight_attrs

from duo_vllm.format import (
    LINEAR_NAMES,
    QUANT_METHOD,
    THRESHOLD_SUFFIX,
    DuoConfig,
    DuoFormatError,
    check_thresholds,
    parse_config,
)
from duo_vllm.linear_kernels import DuoLinearKernel, LayerSpec, choose_kernel

# Under "vllm." so vLLM's logging configuration shows our INFO lines.
logger = logging.getLogger("vllm.duo")

# Zero fraction of a weight vs quantization_config: pruners round the count per row/block (below), and
# the calibrator also zeroes the weights of input channels never active in calibration (above).
SPARSITY_BELOW = 0.02
SPARSITY_ABOVE = 0.1

_DECODER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@register_quantization_config(QUANT_METHOD)
class DuoQuantConfig(QuantizationConfig):
    """The ``quantization_config`` of a duo checkpoint (validated by :func:`duo_vllm.format.parse_config`)."""

    def __init__(self, config: DuoConfig | None = None) -> None:
        super().__init__()
        if config is None:
            # vLLM only builds the config without arguments when config.json has no quantization_config.
            raise DuoFormatError(
                "--quantization duo: the checkpoint's config.json has no quantization_config with "
                "quant_method 'duo', so it is not a duo checkpoint (write one with `duo-calibrate`)"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"DuoQuantConfig({self.config!r})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DuoQuantConfig:
        return cls(parse_config(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            linears = self.checkpoint_linears(prefix)
            return DuoLinearMethod(self.config, linears) if linears else UnquantizedLinearMethod()
        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        return None

    def checkpoint_linears(self, prefix: str) -> list[tuple[int, str]] | None:
        """(layer index, checkpoint linear) of each output shard of a vLLM linear, or None if not a decoder linear.

        e.g. 'model.layers.3.self_attn.qkv_proj' -> [(3, 'self_attn.q_proj'), (3, 'self_attn.k_proj'), ...]
        """
        m = _DECODER_LINEAR.search(prefix)
        if m is None:
            return None
        parent, _, leaf = m.group(2).rpartition(".")
        names = [f"{parent}.{name}" if parent else name for name in self.packed_modules_mapping.get(leaf, [leaf])]
        if not all(name in LINEAR_NAMES for name in names):
            return None
        return [(int(m.group(1)), name) for name in names]


@register_weight_loader_v2_supported_method
class DuoLinearMethod(LinearMethodBase):
    """One decoder linear (possibly fused from several checkpoint linears that share an input)."""

    def __init__(self, config: DuoConfig, linears: list[tuple[int, str]]) -> None:
        self.config = config
        self.linears = linears
        self.output_partition_sizes: list[int] = []
        self.kernel: DuoLinearKernel | None = None  # chosen at load time (duo_vllm.linear_kernels)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        if len(output_partition_sizes) != len(self.linears):
            raise DuoFormatError(
                f"{layer.prefix}: {len(output_partition_sizes)} output shards but checkpoint linears {self.linears}"
            )
        self.output_partition_sizes = list(output_partition_sizes)
        weight_loader = extra_weight_attrs.pop("weight_loader")
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        # One scalar per checkpoint linear, replicated on every rank. vLLM leaves a parameter the
        # checkpoint lacks untouched: NaN makes a missing threshold detectable after loading.
        threshold = PerTensorScaleParameter(
            data=torch.full((len(output_partition_sizes),), math.nan, dtype=torch.float32),
            weight_loader=weight_loader,
        )
        layer.register_parameter(THRESHOLD_SUFFIX, threshold)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        thresholds = getattr(layer, THRESHOLD_SUFFIX).data.tolist()
        # NaN (the fill value) is what a threshold the checkpoint lacks reads as
        check_thresholds(dict(zip(self.linears, thresholds)), self.linears, "duo checkpoint")
        self._check_sparsity(layer)
        # Runtime layout (after TP sharding): one 0-dim threshold in the activation dtype, like the reference.
        layer.input_threshold = Parameter(
            torch.tensor(thresholds[0], dtype=torch.float32).to(layer.weight.dtype).to(layer.weight.device),
            requires_grad=False,
        )
        out_features, in_features = layer.weight.shape
        self.kernel = choose_kernel(LayerSpec(layer.prefix, out_features, in_features, layer.weight.dtype,
                                              layer.weight.device))
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)

    def _check_sparsity(self, layer: torch.nn.Module) -> None:
        """Each shard's zero fraction matches the config, and every value is finite."""
        expected = self.config.weight_sparsity
        shards = layer.weight.data.split(self.output_partition_sizes)
        # float32 (vLLM's CPU shared-memory all-reduce has no float64); a ratio needs no more
        counts = torch.tensor([[float((w == 0).sum()), float(w.numel()), float((~w.isfinite()).sum())]
                               for w in shards])
        if getattr(layer, "tp_size", 1) > 1:
            # masks need not spread evenly over TP shards (e.g. chosen per column block): count the whole
            # weight. Every rank loads every layer in the same order, so this collective is safe here.
            counts = get_tp_group().all_reduce(counts.to(layer.weight.device)).cpu()
        for (layer_idx, name), (zeros, numel, nonfinite) in zip(self.linears, counts.tolist()):
            if nonfinite:  # NaN/inf would reach every token's output, silently (empty completions)
                raise DuoFormatError(
                    f"duo checkpoint: model.layers.{layer_idx}.{name}.weight has {int(nonfinite)} NaN/inf values")
            found = zeros / numel
            if not expected - SPARSITY_BELOW <= found <= expected + SPARSITY_ABOVE:
                raise DuoFormatError(
                    f"duo checkpoint: model.layers.{layer_idx}.{name}.weight is {found:.1%} zeros, "
                    f"but quantization_config (method {self.config.method!r}) implies {expected:.1%}"
                )
