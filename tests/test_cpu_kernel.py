"""The CPU dual-sparse kernel (torch.ops.duo.cpu_sparse_linear) against a float64 reference."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors import safe_open

from duo_vllm.format import apply_threshold, load_thresholds
from duo_vllm.kernels import cpu_kernel

ISAS = list(cpu_kernel.supported_isas())  # every path this CPU runs, the portable one included
# SmolLM2-135M's decoder linears as vLLM fuses them: (N, K)
SMOLLM2_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_kernel.ensure_loaded()


def _pruned(n: int, k: int, p: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < p] = 0.0
    return w


def _run(x, t, w, bias=None, isa="portable", packed=None):
    packed = cpu_kernel.pack(w) if packed is None else packed
    return torch.ops.duo.cpu_sparse_linear(x, torch.tensor(t), packed.blob, packed.offsets, bias, None,
                                           packed.out_features, 2**31 - 1, isa)


def _reference(x, t, w, bias=None):
    y = apply_threshold(x.double(), t) @ w.double().T
    return (y + bias.double() if bias is not None else y).float()


def _assert_close(y, ref):
    """Equal up to fp32 summation order: rtol 1e-5, atol 1e-5 of the output's scale (sums of hundreds of terms)."""
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(float(ref.abs().max()), 1.0))


def _unpack(packed: cpu_kernel.CpuPacked) -> torch.Tensor:
    """The dense weight back from the format, segment by segment (a test oracle, independent of the kernel)."""
    tiles, k = packed.offsets.shape
    words, width = packed.words, packed.tile_width
    as_int = packed.blob.view(torch.int32)
    w = torch.zeros(tiles * width, k)
    end = 0
    for t in range(tiles):
        for c in range(k):
            start = int(packed.offsets[t, c])
            assert start == end  # segments follow each other, tile by tile, channel by channel
            bits = [(int(word) >> b) & 1 for word in as_int[start : start + words].tolist() for b in range(32)]
            rows = [t * width + o for o, bit in enumerate(bits) if bit]
            w[rows, c] = packed.blob[start + words : start + words + len(rows)]
            end = start + words + len(rows)
    assert torch.equal(packed.blob[end:], torch.zeros(cpu_kernel.PAD))
    return w[: packed.out_features]


@pytest.mark.parametrize("shape", [(1, 1), (37, 45), (33, 100), (4100, 24), (960, 57)])
def test_pack_is_lossless_and_drops_zeros(shape):
    gen = torch.Generator().manual_seed(0)
    w = _pruned(*shape, 0.5, gen)
    w[:, -1] = float("nan")  # any bits survive packing
    w[0, :] = -0.0  # a zero with its sign bit set is still a zero
    packed = cpu_kernel.pack(w)
    unpacked = _unpack(packed)
    assert torch.equal(unpacked.nan_to_num(7.0), w.nan_to_num(7.0)) and unpacked.isnan().equal(w.isnan())
    tiles = packed.offsets.shape[0]
    assert packed.blob.numel() == int((w != 0).sum()) + tiles * shape[1] * packed.words + cpu_kernel.PAD
    # wide tiles: one tile up to MAX_TILE outputs, equal tiles above
    assert packed.tile_width <= cpu_kernel.MAX_TILE and (tiles - 1) * packed.tile_width < shape[0]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(37, 45), (1, 1), (64, 7), *SMOLLM2_SHAPES.values()])
def test_matches_the_reference_for_every_batch_size(isa, shape):
    gen = torch.Generator().manual_seed(1)
    n, k = shape
    w = _pruned(n, k, 0.5, gen)
    bias = torch.randn(n, generator=gen)
    packed = cpu_kernel.pack(w)
    for m in [1, 2, 3, 4, 5, 8, 16, 17, 33]:
        x = torch.randn(m, k, generator=gen)
        y = _run(x, 0.6, w, bias, isa, packed)
        _assert_close(y, _reference(x, 0.6, w, bias))


@pytest.mark.parametrize("isa", ISAS)
def test_dead_channels_zero_inputs_and_threshold_semantics(isa):
    gen = torch.Generator().manual_seed(2)
    w = _pruned(70, 40, 0.5, gen)
    w[:, 5:17] = 0.0  # dead input channels, as the calibrator writes them
    w[3:40, :] = 0.0  # and fully pruned outputs
    bias = torch.randn(70, generator=gen)
    for m in (1, 3, 9):
        x = torch.randn(m, 40, generator=gen)
        _assert_close(_run(x, 0.5, w, bias, isa), _reference(x, 0.5, w, bias))
        # all inputs under the threshold (or zero): the bias alone
        assert torch.equal(_run(torch.zeros(m, 40), 0.0, w, bias, isa), bias.expand(m, 70))
        assert torch.equal(_run(x.clamp(-0.3, 0.3), 0.3, w, None, isa), torch.zeros(m, 70))
    # strictly greater: |x| == t is dropped, threshold 0 keeps every nonzero, NaN is dropped like torch.where
    x = torch.zeros(1, 40)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 0.5, -0.5, 0.51, float("nan")
    eye = torch.eye(40)
    assert torch.equal(_run(x, 0.5, eye, None, isa)[0, :4], torch.tensor([0.0, 0.0, 0.51, 0.0]))
    assert torch.equal(_run(x, 0.0, eye, None, isa)[0, :4], torch.tensor([0.5, -0.5, 0.51, 0.0]))


def test_gemm_path_above_the_crossover_thresholds_like_the_sparse_path():
    vllm_ops = pytest.importorskip("vllm._custom_ops")
    gen = torch.Generator().manual_seed(5)
    w = _pruned(96, 40, 0.5, gen)
    packed, gemm = cpu_kernel.pack(w), vllm_ops.create_onednn_mm(w.t(), 32)
    bias = torch.randn(96, generator=gen)
    x = torch.randn(6, 40, generator=gen)
    x[0, 0], x[0, 1], x[1, 2], x[2, 3] = 0.5, -0.5, float("nan"), float("-inf")  # == t dropped, NaN dropped
    for max_m in (0, 6):  # every token through oneDNN, then every token through the sparse kernel
        y = cpu_kernel.sparse_linear(x, torch.tensor(0.5), packed, bias, gemm.handler_tensor, max_m)
        assert not y[2].isfinite().all()  # -inf survives the threshold, as in torch.where
        rest = [0, 1, 3, 4, 5]
        _assert_close(y[rest], _reference(x, 0.5, w, bias)[rest])


@pytest.mark.parametrize("isa", ISAS)
def test_a_tokens_result_does_not_depend_on_its_batch(isa):
    gen = torch.Generator().manual_seed(3)
    w = _pruned(576, 1536, 0.5, gen)
    packed = cpu_kernel.pack(w)
    x = torch.randn(7, 1536, generator=gen)
    batch = _run(x, 0.7, w, None, isa, packed)
    for r in range(7):
        assert torch.equal(_run(x[r : r + 1], 0.7, w, None, isa, packed)[0], batch[r])


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX2+FMA: only the portable path runs")
@pytest.mark.parametrize("m", [1, 3, 5])
def test_simd_and_portable_paths_agree(m):
    gen = torch.Generator().manual_seed(4)
    w = _pruned(960, 576, 0.5, gen)
    packed = cpu_kernel.pack(w)
    x = torch.randn(m, 576, generator=gen)
    portable = _run(x, 0.4, w, None, "portable", packed)
    for isa in ISAS[:-1]:
        _assert_close(_run(x, 0.4, w, None, isa, packed), portable)


def test_an_isa_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv("DUO_CPU_ISA", "neon")
    with pytest.raises(cpu_kernel.CpuKernelUnavailable, match="DUO_CPU_ISA=neon: this CPU runs the kernel with"):
        cpu_kernel.isa()
    monkeypatch.setenv("DUO_CPU_ISA", "portable")
    assert cpu_kernel.isa() == "portable"


def test_real_smollm2_weights_and_thresholds(duo_checkpoint):
    """Every linear of three decoder layers of a DuoGPT W50+X50 checkpoint, with its calibrated threshold."""
    ckpt = duo_checkpoint("duogpt", 0.5, 0.5)
    thresholds = load_thresholds(ckpt)
    gen = torch.Generator().manual_seed(5)
    with safe_open(str(next(ckpt.glob("*.safetensors"))), framework="pt") as sf:
        for layer, name in itertools.product((0, 14, 29), ("self_attn.q_proj", "self_attn.o_proj",
                                                           "mlp.up_proj", "mlp.down_proj")):
            w = sf.get_tensor(f"model.layers.{layer}.{name}.weight").float()
            t = thresholds[(layer, name)]
            x = torch.randn(4, w.shape[1], generator=gen) * 2 * t  # about half the entries above t
            for isa in ISAS:
                _assert_close(_run(x, t, w, None, isa), _reference(x, t, w))


def test_is_a_custom_op_torch_compile_can_trace():
    gen = torch.Generator().manual_seed(6)
    w = _pruned(40, 24, 0.5, gen)
    packed = cpu_kernel.pack(w)
    x, t = torch.randn(3, 24, generator=gen), torch.tensor(0.3)
    args = (x, t, packed.blob, packed.offsets, None, None, 40, 8, "portable")
    torch.library.opcheck(torch.ops.duo.cpu_sparse_linear.default, args)

    def f(x):
        return cpu_kernel.sparse_linear(x, t, packed) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x.view(1, 3, 24)), f(x.view(1, 3, 24)))


def test_bad_layouts_are_refused_with_a_message():
    packed = cpu_kernel.pack(torch.eye(8))
    op = torch.ops.duo.cpu_sparse_linear
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 CPU tensor"):
        op(torch.ones(2, 8, dtype=torch.float64), torch.tensor(0.0), packed.blob, packed.offsets, None, None, 8, 8,
           "portable")
    with pytest.raises(RuntimeError, match=r"offsets must be contiguous int32 \[tiles, 9\]"):
        op(torch.ones(2, 9), torch.tensor(0.0), packed.blob, packed.offsets, None, None, 8, 8, "portable")
    with pytest.raises(RuntimeError, match="2 tiles do not split 8 outputs into equal tiles"):
        op(torch.ones(2, 8), torch.tensor(0.0), packed.blob, packed.offsets.repeat(2, 1), None, None, 8, 8,
           "portable")
    with pytest.raises(RuntimeError, match="isa must be 'avx512', 'avx2' or 'portable'"):
        op(torch.ones(2, 8), torch.tensor(0.0), packed.blob, packed.offsets, None, None, 8, 8, "sse")
    with pytest.raises(ValueError, match="packs float32"):
        cpu_kernel.pack(torch.eye(8, dtype=torch.bfloat16))


def test_crossover_comes_from_the_table_for_this_cpu_isa_and_the_nearest_density(tmp_path, monkeypatch):
    name = cpu_kernel.cpu_name()
    table = {"cpus": {name: {"avx512": {"2": {"weight_density": {"0.5": {"default": 4, "shapes": {"960x576": 8}},
                                                                 "1.0": {"default": 2, "shapes": {"960x576": 1}}}}},
                             "avx2": {"2": {"weight_density": {"0.5": {"default": 2, "shapes": {"960x576": 3}}}}}}}}
    assert cpu_kernel.max_sparse_m(960, 576, 0.5, "avx512", threads=2, table=table)[0] == 8
    assert cpu_kernel.max_sparse_m(960, 576, 0.6, "avx512", threads=2, table=table)[0] == 8
    assert cpu_kernel.max_sparse_m(960, 576, 0.9, "avx512", threads=2, table=table)[0] == 1
    m, why = cpu_kernel.max_sparse_m(100, 576, 1.0, "avx512", threads=2, table=table)
    assert m == 2 and "default" in why and "weight density 1.0" in why and "isa avx512" in why
    # one CPU name, another instruction set: its own entry, never the other path's
    m, why = cpu_kernel.max_sparse_m(960, 576, 0.5, "avx2", threads=2, table=table)
    assert m == 3 and "isa avx2" in why
    for isa_name, threads in (("avx512", 1), ("portable", 2)):
        m, why = cpu_kernel.max_sparse_m(960, 576, 0.5, isa_name, threads=threads, table=table)
        assert m == cpu_kernel.UNMEASURED_MAX_SPARSE_M and "no crossover measured" in why and isa_name in why
    assert cpu_kernel.pack(torch.tensor([[1.0, 0.0], [0.0, 0.0]])).weight_density == 0.25
    committed = json.loads(cpu_kernel.TABLE_PATH.read_text())
    for cpu, by_isa in committed["cpus"].items():
        assert set(by_isa) <= set(cpu_kernel.ISAS), cpu
        for threads, entry in ((t, e) for by_threads in by_isa.values() for t, e in by_threads.items()):
            assert int(threads) >= 1 and entry["weight_density"], (cpu, threads)
            for density, at in entry["weight_density"].items():
                assert 0 < float(density) <= 1 and at["default"] >= 1, (cpu, threads, density)
                assert all(m >= 0 for m in at["shapes"].values()), (cpu, threads, density)
