"""The vLLM plugin in isolation: the custom op, the config, weight loading into fused layers, validation.

Real vLLM layers are built in a one-process (world size 1) distributed environment; no engine starts.
"""
from __future__ import annotations

import socket
from importlib.metadata import entry_points

import pytest
import torch

from duo_vllm.format import DuoConfig, DuoFormatError, apply_threshold

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")

from duo_vllm.quant import DuoLinearMethod, DuoQuantConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["cpu", "torch"])
def kernel(request, monkeypatch):
    """Each CPU kernel in turn, through the DUO_KERNEL override."""
    monkeypatch.setenv("DUO_KERNEL", request.param)
    return request.param


@pytest.fixture(scope="module")
def vllm_env():
    """A world-size-1 tensor-parallel group inside a vLLM config context, as vLLM's workers have."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
        )
        initialize_model_parallel(1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


def _config(weight_sparsity: float = 0.5) -> DuoQuantConfig:
    qc = DuoQuantConfig(DuoConfig(weight_sparsity=weight_sparsity))
    qc.packed_modules_mapping.update(
        {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    )
    return qc


def _pruned(rows: int, cols: int, sparsity: float = 0.5) -> torch.Tensor:
    w = torch.randn(rows, cols)
    k = int(cols * sparsity)
    if k:
        w.scatter_(1, w.abs().argsort(dim=1)[:, :k], 0.0)
    return w


# --- registration ------------------------------------------------------------------------


def test_entry_point_registers_duo():
    from vllm.model_executor.layers.quantization import get_quantization_config

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "duo"]
    register = ep.load()
    register()
    register()  # vLLM calls it in every process, possibly more than once
    assert get_quantization_config("duo") is DuoQuantConfig


# --- config -------------------------------------------------------------------------------------


def test_config_from_checkpoint_dict():
    raw = {"quant_method": "duo", "format_version": 1, "method": "teal", "weight_sparsity": 0.0, "act_sparsity": 0.4}
    qc = DuoQuantConfig.from_config(raw)
    assert qc.get_name() == "duo" and qc.config.method == "teal" and qc.config.act_sparsity == 0.4
    with pytest.warns(FutureWarning, match="method 'dense' is now called 'teal'"):  # checkpoints written before
        assert DuoQuantConfig.from_config({**raw, "method": "dense"}).config.method == "teal"
    with pytest.raises(DuoFormatError, match="method 'teal' keeps every weight"):
        DuoQuantConfig.from_config({**raw, "weight_sparsity": 0.5})
    assert torch.float32 in qc.get_supported_act_dtypes()
    with pytest.raises(DuoFormatError, match=r"weight_sparsity: Input should be less than 1"):
        DuoQuantConfig.from_config({**raw, "weight_sparsity": 1.5})
    with pytest.raises(DuoFormatError, match=r"quantization_config lacks weight_sparsity, act_sparsity"):
        DuoQuantConfig.from_config({"quant_method": "duo", "format_version": 1, "method": "teal"})
    with pytest.raises(DuoFormatError, match=r"format_version: .*2 is newer than this duo-vllm reads \(1\): upgrade"):
        DuoQuantConfig.from_config({**raw, "format_version": 2})
    with pytest.raises(DuoFormatError, match=r"format_version: .*0 is not a duo format version"):
        DuoQuantConfig.from_config({**raw, "format_version": 0})
    with pytest.raises(DuoFormatError, match=r"sparsity_pattern: Extra inputs are not permitted"):
        DuoQuantConfig.from_config({**raw, "sparsity_pattern": "2:4"})


def test_config_without_checkpoint_config_is_refused():
    # what vLLM builds for `--quantization duo` on a checkpoint without a quantization_config
    with pytest.raises(DuoFormatError, match="not a duo checkpoint"):
        DuoQuantConfig()


def test_decoder_linears_map_to_checkpoint_names():
    qc = _config()
    assert qc.checkpoint_linears("model.layers.3.self_attn.qkv_proj") == [
        (3, "self_attn.q_proj"), (3, "self_attn.k_proj"), (3, "self_attn.v_proj")]
    assert qc.checkpoint_linears("model.layers.0.mlp.gate_up_proj") == [(0, "mlp.gate_proj"), (0, "mlp.up_proj")]
    assert qc.checkpoint_linears("model.layers.29.self_attn.o_proj") == [(29, "self_attn.o_proj")]
    assert qc.checkpoint_linears("model.layers.29.mlp.down_proj") == [(29, "mlp.down_proj")]
    assert qc.checkpoint_linears("lm_head") is None
    assert qc.checkpoint_linears("model.layers.0.mlp.router") is None


def test_quant_methods_per_layer(vllm_env):
    from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    qc = _config()
    qkv = QKVParallelLinear(64, 16, 4, 2, bias=False, quant_config=qc, prefix="model.layers.0.self_attn.qkv_proj")
    assert isinstance(qkv.quant_method, DuoLinearMethod)
    other = ReplicatedLinear(64, 8, bias=False, quant_config=qc, prefix="model.layers.0.mlp.router")
    assert isinstance(other.quant_method, UnquantizedLinearMethod)
    embed = VocabParallelEmbedding(128, 64, quant_config=qc, prefix="model.embed_tokens")
    head = ParallelLMHead(128, 64, quant_config=qc, prefix="lm_head")
    assert isinstance(embed.quant_method, UnquantizedEmbeddingMethod)
    assert isinstance(head.quant_method, UnquantizedEmbeddingMethod)


# --- loading, runtime, validation ---------------------------------------------------------------


def _load(layer, weights: dict, thresholds: dict) -> None:
    """Feed checkpoint tensors through vLLM's weight loaders, shard id by shard id."""
    for shard, w in weights.items():
        layer.weight.weight_loader(layer.weight, w, *([shard] if shard is not None else []))
    for shard, t in thresholds.items():
        p = layer.input_threshold
        p.weight_loader(p, torch.tensor(t), *([shard] if shard is not None else []))


def _qkv(qc: DuoQuantConfig):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    return QKVParallelLinear(64, 16, 4, 2, bias=False, quant_config=qc, prefix="model.layers.2.self_attn.qkv_proj")


def _reference(x: torch.Tensor, t: float, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(apply_threshold(x.double(), t), w.double()).float()


def test_fused_layers_load_and_compute_like_the_reference(vllm_env, kernel):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    qc = _config()
    x = torch.randn(6, 64)
    qkv = _qkv(qc)
    w = {"q": _pruned(64, 64), "k": _pruned(32, 64), "v": _pruned(32, 64)}
    _load(qkv, w, {"q": 0.4, "k": 0.4, "v": 0.4})
    qkv.quant_method.process_weights_after_loading(qkv)
    assert qkv.quant_method.kernel.name == kernel
    assert qkv.weight.numel() == 0  # the kernel keeps its own layout; the loaded weight is freed
    out, _ = qkv(x)
    ref = torch.cat([_reference(x, 0.4, w[s]) for s in "qkv"], dim=-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    gate_up = MergedColumnParallelLinear(
        64, [48, 48], bias=False, quant_config=qc, prefix="model.layers.2.mlp.gate_up_proj"
    )
    w = {0: _pruned(48, 64), 1: _pruned(48, 64)}
    _load(gate_up, w, {0: 0.1, 1: 0.1})
    gate_up.quant_method.process_weights_after_loading(gate_up)
    out, _ = gate_up(x)
    torch.testing.assert_close(out, _reference(x, 0.1, torch.cat([w[0], w[1]])), rtol=1e-5, atol=1e-5)

    down = RowParallelLinear(64, 32, bias=False, quant_config=qc, prefix="model.layers.2.mlp.down_proj")
    wd = _pruned(32, 64)
    _load(down, {None: wd}, {None: 0.25})
    down.quant_method.process_weights_after_loading(down)
    out, _ = down(x)
    torch.testing.assert_close(out, _reference(x, 0.25, wd), rtol=1e-5, atol=1e-5)
    assert down.input_threshold.dtype == torch.float32 and down.input_threshold.dim() == 0


@pytest.mark.parametrize(
    "thresholds, weights_sparsity, message",
    [
        ({"q": 0.4, "v": 0.4}, 0.5, r"model\.layers\.2\.self_attn\.k_proj\.input_threshold is missing"),
        ({"q": 0.4, "k": float("inf"), "v": 0.4}, 0.5, r"k_proj\.input_threshold = inf"),
        ({"q": 0.4, "k": -1.0, "v": 0.4}, 0.5, r"k_proj\.input_threshold = -1\.0"),
        ({"q": 0.4, "k": 0.5, "v": 0.4}, 0.5, r"layer 2 .* share one input"),
        ({"q": 0.4, "k": 0.4, "v": 0.4}, 0.0, r"layers\.2\.self_attn\.q_proj\.weight is 0\.0% zeros, .*implies 50\.0%"),
        ({"q": 0.4, "k": 0.4, "v": 0.4}, 0.75, r"q_proj\.weight is 75\.0% zeros"),
    ],
)
def test_bad_checkpoint_tensors_are_named(vllm_env, thresholds, weights_sparsity, message):
    qkv = _qkv(_config(weight_sparsity=0.5))
    w = {"q": _pruned(64, 64, weights_sparsity), "k": _pruned(32, 64), "v": _pruned(32, 64)}
    _load(qkv, w, thresholds)
    with pytest.raises(DuoFormatError, match=message):
        qkv.quant_method.process_weights_after_loading(qkv)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(vllm_env, value):
    qkv = _qkv(_config(weight_sparsity=0.5))
    w = {"q": _pruned(64, 64), "k": _pruned(32, 64), "v": _pruned(32, 64)}
    w["v"][3, w["v"][3].nonzero()[0]] = value
    _load(qkv, w, {s: 0.4 for s in "qkv"})
    with pytest.raises(DuoFormatError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight has 1 NaN/inf values"):
        qkv.quant_method.process_weights_after_loading(qkv)


def test_a_few_extra_zeros_are_accepted(vllm_env):
    # the calibrator zeroes the weights of input channels never active in calibration
    qkv = _qkv(_config(weight_sparsity=0.5))
    _load(qkv, {"q": _pruned(64, 64, 0.55), "k": _pruned(32, 64), "v": _pruned(32, 64)}, {s: 0.4 for s in "qkv"})
    qkv.quant_method.process_weights_after_loading(qkv)


# --- the kernel seam ----------------------------------------------------------------------------


def _spec(dtype=torch.float32, device="cpu"):
    from duo_vllm.linear_kernels import LayerSpec

    return LayerSpec("model.layers.0.mlp.down_proj", 32, 64, dtype, torch.device(device))


def test_seam_picks_the_cpu_kernel_for_fp32_on_cpu_and_says_why_not_triton(monkeypatch, caplog):
    from duo_vllm import linear_kernels

    monkeypatch.delenv("DUO_KERNEL", raising=False)
    monkeypatch.setattr(linear_kernels, "_logged", set())
    with caplog.at_level("INFO", logger="vllm.duo"):
        assert linear_kernels.choose_kernel(_spec()).name == "cpu"
        linear_kernels.choose_kernel(_spec())  # same outcome: not logged again
    lines = [r.getMessage() for r in caplog.records if "serves" in r.getMessage()]
    assert len(lines) == 1 and "kernel 'cpu' serves cpu-float32" in lines[0]
    assert "refused: triton: device is cpu, not cuda" in lines[0]


def test_seam_refusals_name_the_reason():
    from duo_vllm.linear_kernels import CpuSparseKernel, TorchKernel, TritonKernel

    assert CpuSparseKernel.can_implement(_spec(torch.bfloat16)) == (
        False, "dtype is torch.bfloat16; the CPU kernel is float32 only")
    assert CpuSparseKernel.can_implement(_spec(device="meta"))[1] == "device is meta, not cpu"
    assert TritonKernel.can_implement(_spec()) == (False, "device is cpu, not cuda")
    assert TorchKernel.can_implement(_spec(torch.bfloat16)) == (True, None)


def test_seam_bf16_on_cpu_goes_to_the_torch_kernel(monkeypatch):
    from duo_vllm.linear_kernels import choose_kernel

    monkeypatch.delenv("DUO_KERNEL", raising=False)
    assert choose_kernel(_spec(torch.bfloat16)).name == "torch"


def test_seam_override_that_cannot_serve_is_an_error(monkeypatch):
    from duo_vllm.linear_kernels import choose_kernel

    monkeypatch.setenv("DUO_KERNEL", "triton")
    with pytest.raises(RuntimeError, match=r"DUO_KERNEL=triton: kernel 'triton' cannot serve "
                                           r"model\.layers\.0\.mlp\.down_proj .*device is cpu, not cuda"):
        choose_kernel(_spec())
    monkeypatch.setenv("DUO_KERNEL", "cpu")
    with pytest.raises(RuntimeError, match="float32 only"):
        choose_kernel(_spec(torch.bfloat16))
    monkeypatch.setenv("DUO_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"DUO_KERNEL='fast': unknown kernel, expected one of triton, cpu, torch"):
        choose_kernel(_spec())


def test_cpu_kernel_serves_a_layer_with_bias_above_and_below_the_crossover(vllm_env, monkeypatch):
    from vllm.model_executor.layers.linear import RowParallelLinear

    monkeypatch.setenv("DUO_KERNEL", "cpu")
    down = RowParallelLinear(64, 32, bias=True, quant_config=_config(), prefix="model.layers.2.mlp.down_proj")
    wd = _pruned(32, 64)
    _load(down, {None: wd}, {None: 0.25})
    down.bias.data.copy_(torch.randn(32))
    down.quant_method.process_weights_after_loading(down)
    kernel = down.quant_method.kernel
    for m in (1, kernel.max_sparse_m, kernel.max_sparse_m + 1, 40):  # sparse kernel, then oneDNN
        x = torch.randn(m, 64)
        out, _ = down(x)
        torch.testing.assert_close(out, _reference(x, 0.25, wd) + down.bias, rtol=1e-5, atol=1e-5)
