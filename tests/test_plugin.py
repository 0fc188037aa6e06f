"""The vLLM plugin in isolation: the custom op, the config, weight loading into fused layers, validation.

Real vLLM layers are built in a one-process (world size 1) distributed environment; no engine starts.
"""
from __future__ import annotations

import socket
from importlib.metadata import entry_points

import pytest
import torch

from duo_vllm.format import DuoConfig, DuoFormatError, apply_threshold
from duo_vllm.ops import threshold_linear

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")

from duo_vllm.quant import DuoLinearMethod, DuoQuantConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# --- registration and op ------------------------------------------------------------------------


def test_entry_point_registers_duo():
    from vllm.model_executor.layers.quantization import get_quantization_config

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "duo"]
    register = ep.load()
    register()
    register()  # vLLM calls it in every process, possibly more than once
    assert get_quantization_config("duo") is DuoQuantConfig


def test_threshold_linear_matches_definition():
    x, w, b = torch.randn(7, 32), torch.randn(5, 32), torch.randn(5)
    t = torch.tensor(0.7)
    expected = torch.nn.functional.linear(apply_threshold(x, t), w, b)
    assert torch.equal(threshold_linear(x, t, w, b), expected)
    assert torch.equal(threshold_linear(x, t, w, None), torch.nn.functional.linear(apply_threshold(x, t), w))
    # strictly greater: a value equal to the threshold is dropped
    x = torch.tensor([[0.7, -0.7, 0.71]])
    assert torch.equal(threshold_linear(x, t, torch.eye(3)), torch.tensor([[0.0, 0.0, 0.71]]))


def test_threshold_linear_is_a_traceable_custom_op():
    x, w, t = torch.randn(3, 4, 16), torch.randn(8, 16), torch.tensor(0.3)
    torch.library.opcheck(torch.ops.duo.threshold_linear.default, (x, t, w, None))
    compiled = torch.compile(lambda x: threshold_linear(x, t, w, None), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), threshold_linear(x, t, w, None))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = threshold_linear(torch.empty(3, 4, 16), torch.empty(()), torch.empty(8, 16), None)
    assert out.shape == (3, 4, 8)


# --- config -------------------------------------------------------------------------------------


def test_config_from_checkpoint_dict():
    qc = DuoQuantConfig.from_config({"quant_method": "duo", "method": "dense", "weight_sparsity": 0.0})
    assert qc.get_name() == "duo" and qc.config.method == "dense"
    assert torch.float32 in qc.get_supported_act_dtypes()
    with pytest.raises(DuoFormatError, match="weight_sparsity"):
        DuoQuantConfig.from_config({"quant_method": "duo", "weight_sparsity": 1.5})


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


def test_fused_layers_load_and_compute_like_the_reference(vllm_env):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    qc = _config()
    x = torch.randn(6, 64)
    qkv = _qkv(qc)
    w = {"q": _pruned(64, 64), "k": _pruned(32, 64), "v": _pruned(32, 64)}
    _load(qkv, w, {"q": 0.4, "k": 0.4, "v": 0.4})
    qkv.quant_method.process_weights_after_loading(qkv)
    out, _ = qkv(x)
    ref = torch.cat([torch.nn.functional.linear(apply_threshold(x, 0.4), w[s]) for s in "qkv"], dim=-1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out, threshold_linear(x, torch.tensor(0.4), torch.cat(list(w.values())), None))

    gate_up = MergedColumnParallelLinear(
        64, [48, 48], bias=False, quant_config=qc, prefix="model.layers.2.mlp.gate_up_proj"
    )
    w = {0: _pruned(48, 64), 1: _pruned(48, 64)}
    _load(gate_up, w, {0: 0.1, 1: 0.1})
    gate_up.quant_method.process_weights_after_loading(gate_up)
    out, _ = gate_up(x)
    assert torch.equal(out, torch.nn.functional.linear(apply_threshold(x, 0.1), torch.cat([w[0], w[1]])))

    down = RowParallelLinear(64, 32, bias=False, quant_config=qc, prefix="model.layers.2.mlp.down_proj")
    wd = _pruned(32, 64)
    _load(down, {None: wd}, {None: 0.25})
    down.quant_method.process_weights_after_loading(down)
    out, _ = down(x)
    assert torch.equal(out, torch.nn.functional.linear(apply_threshold(x, 0.25), wd))
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


def test_a_few_extra_zeros_are_accepted(vllm_env):
    # the calibrator zeroes the weights of input channels never active in calibration
    qkv = _qkv(_config(weight_sparsity=0.5))
    _load(qkv, {"q": _pruned(64, 64, 0.55), "k": _pruned(32, 64), "v": _pruned(32, 64)}, {s: 0.4 for s in "qkv"})
    qkv.quant_method.process_weights_after_loading(qkv)
