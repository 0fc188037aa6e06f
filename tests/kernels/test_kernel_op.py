"""The ``duo::dual_sparse_linear`` op: dispatch, CPU path, fake impl, torch.compile, import guards."""
import json
import subprocess
import sys

import pytest
import torch
from kernel_helpers import HAS_CUDA, TOL, make_input, make_weight, reference, rel_err

from duo_vllm.kernels import can_serve, choose_path, dispatch, dual_sparse_linear, load_table, pack_weight

# raised inside torch.compile / opcheck, not by this code
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_default_dispatch():
    assert [choose_path(m, 4096, 4096, table={}) for m in (1, 4, 5, 512)] == ["dual"] * 2 + ["gemm"] * 2
    assert [choose_path(m, 4096, 4096, has_gemm_weight=False, table={}) for m in (1, 16, 17, 512)] == \
        ["dual"] * 2 + ["wsparse"] * 2


def test_table_dispatch(tmp_path):
    path = tmp_path / "crossover.json"
    by_m = {"1": "dual", "4": "wsparse", "16": "gemm"}
    path.write_text(json.dumps({"device": "test", "shapes": {"12288x4096": by_m}}))
    table = load_table(path)
    assert [choose_path(m, 12288, 4096, table=table) for m in (1, 2, 4, 9, 16)] == \
        ["dual", "wsparse", "wsparse", "gemm", "gemm"]
    assert choose_path(17, 12288, 4096, table=table) == "gemm"  # beyond the table: default
    assert choose_path(8, 12288, 4096, has_gemm_weight=False, table=table) == "wsparse"
    assert choose_path(2, 4096, 4096, table=table) == "dual"  # shape not in the table: default
    # a table written before "dense" was renamed "gemm" still loads, as "gemm"
    path.write_text(json.dumps({"device": "test", "shapes": {"12288x4096": {**by_m, "16": "dense"}}}))
    assert load_table.__wrapped__(path) == table
    path.write_text(json.dumps({"shapes": {"8x8": {"1": "fast"}}}))
    with pytest.raises(ValueError, match="unknown path"):
        load_table.__wrapped__(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("keep_gemm_weight", [True, False])
def test_cpu_op(dtype, keep_gemm_weight):
    gen = torch.Generator().manual_seed(0)
    w = make_weight(96, 80, 0.5, dtype, gen)
    x, t = make_input(6, 80, 0.5, dtype, gen)
    b = torch.randn(96, generator=gen).to(dtype)
    packed = pack_weight(w, keep_gemm_weight=keep_gemm_weight)
    ref = reference(x, t, w, b)
    for thr in (t, t.reshape(1)):
        y = dual_sparse_linear(x.view(2, 3, 80), thr, packed, b)  # leading dims are kept
        assert y.shape == (2, 3, 96) and y.dtype == dtype
        assert rel_err(y.reshape(6, 96), ref) < TOL[dtype]
    assert rel_err(dual_sparse_linear(x, t, packed), reference(x, t, w)) < TOL[dtype]


def test_rejects_mismatches():
    packed = pack_weight(torch.eye(8, dtype=torch.bfloat16))
    x, t = torch.ones(2, 8, dtype=torch.bfloat16), torch.tensor(0.5)
    with pytest.raises(ValueError, match="does not match"):
        dual_sparse_linear(x.float(), t, packed)
    with pytest.raises(ValueError, match="does not match"):
        dual_sparse_linear(x[:, :4], t, packed)
    with pytest.raises(ValueError, match="one value"):
        dual_sparse_linear(x, torch.tensor([0.5, 0.5]), packed)


def _args(packed, x, t, b):
    return (x, t, packed.values, packed.masks, packed.offsets, packed.tickets, packed.gemm_weight, b,
            packed.out_features, packed.block_n)


def test_opcheck():
    """Schema, fake (meta) implementation and dispatch registrations agree with the real CPU path."""
    gen = torch.Generator().manual_seed(1)
    w = make_weight(40, 24, 0.5, torch.float32, gen)
    x, t = make_input(3, 24, 0.5, torch.float32, gen)
    b = torch.randn(40, generator=gen)
    for packed, bias in ((pack_weight(w, keep_gemm_weight=True), b), (pack_weight(w), None)):
        torch.library.opcheck(torch.ops.duo.dual_sparse_linear.default, _args(packed, x, t, bias),
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    w = make_weight(64, 32, 0.5, torch.float32, gen)
    x, t = make_input(4, 32, 0.5, torch.float32, gen)
    packed = pack_weight(w)
    fn = torch.compile(lambda x, t: dual_sparse_linear(x, t, packed) * 2, fullgraph=True)
    assert rel_err(fn(x, t), 2 * reference(x, t, w)) < TOL[torch.float32]


def test_can_serve():
    if _has_triton():
        assert can_serve((4096, 4096), torch.bfloat16, "cuda") == (True, "")
        assert can_serve((12288, 4096), torch.float16, torch.device("cuda", 1)) == (True, "")
    ok, why = can_serve((4096, 4096), torch.bfloat16, "cpu")
    assert not ok and "CUDA" in why
    ok, why = can_serve((4096, 4096), torch.float32, "cuda")
    assert not ok and "bfloat16 and float16" in why
    ok, why = can_serve((65536, 65536), torch.bfloat16, "cuda")
    assert not ok and "int32" in why
    ok, why = can_serve((0, 8), torch.bfloat16, "cuda")
    assert not ok and "N, K >= 1" in why
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch; from duo_vllm.kernels import can_serve\n"
            "ok, why = can_serve((64, 64), torch.bfloat16, 'cuda'); assert not ok and 'triton' in why, why")
    subprocess.run([sys.executable, "-c", code], check=True)


def _has_triton() -> bool:
    try:
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def test_cuda_path_without_triton_raises(monkeypatch):
    """On CUDA the op never falls back to torch silently when triton is missing (CPU tensors stand in)."""
    monkeypatch.setattr(dispatch, "_triton_kernels", lambda: None)
    w = make_weight(16, 8, 0.5, torch.bfloat16, torch.Generator().manual_seed(0))
    x, t = make_input(2, 8, 0.5, torch.bfloat16, torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="need triton"):
        dispatch._cuda_impl(*_args(pack_weight(w), x, t, None))
    # the gemm path (a kept gemm weight, large M) is cuBLAS and needs no triton
    x, t = make_input(64, 8, 0.5, torch.bfloat16, torch.Generator().manual_seed(2))
    y = dispatch._cuda_impl(*_args(pack_weight(w, keep_gemm_weight=True), x, t, None))
    assert rel_err(y, reference(x, t, w)) < TOL[torch.bfloat16]


def test_import_never_needs_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # importing triton now raises ImportError
        "import torch, duo_vllm.kernels as K\n"
        "p = K.pack_weight(torch.eye(8))\n"
        "y = K.dual_sparse_linear(torch.ones(1, 8), torch.tensor(0.5), p)\n"
        "assert torch.equal(y, torch.ones(1, 8)), y\n"
        "assert K.dispatch._triton_kernels() is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, duo_vllm.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 3, 8, 200])
@pytest.mark.parametrize("keep_gemm_weight", [True, False])
def test_cuda_op(m, keep_gemm_weight):
    gen = torch.Generator().manual_seed(m)
    w = make_weight(4096, 4096, 0.5, torch.bfloat16, gen)
    x, t = make_input(m, 4096, 0.5, torch.bfloat16, gen)
    b = torch.randn(4096, generator=gen).to(torch.bfloat16)
    ref = reference(x, t, w, b)
    packed = pack_weight(w.cuda(), keep_gemm_weight=keep_gemm_weight)
    y = dual_sparse_linear(x.cuda(), t.cuda(), packed, b.cuda())
    assert rel_err(y.cpu(), ref) < TOL[torch.bfloat16]
    fn = torch.compile(lambda x, t: dual_sparse_linear(x, t, packed, b.cuda()), fullgraph=True)
    assert rel_err(fn(x.cuda(), t.cuda()).cpu(), ref) < TOL[torch.bfloat16]
