"""Triton kernels against a float64 reference: interpreted at small shapes on CPU, real shapes on CUDA."""
import itertools

import pytest
import torch
from kernel_helpers import DEVICE, HAS_CUDA, TOL, make_input, make_weight, reference, rel_err

from duo_vllm.kernels import pack_weight

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
BATCHES = (1, 2, 3, 4, 5, 8, 16)

# every (p_w, p_x) pair once; dtype and batch rotate through the grid (a Latin-square design, not the
# full product, to keep the interpreter run short)
GRID = [
    (p_w, p_x, DTYPES[(i + j) % 3], BATCHES[(i + 2 * j) % len(BATCHES)])
    for (i, p_w), (j, p_x) in itertools.product(enumerate(SPARSITIES), enumerate(SPARSITIES))
]


def _problem(n, k, m, p_w, p_x, dtype, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    w = make_weight(n, k, p_w, dtype, gen)
    x, t = make_input(m, k, p_x, dtype, gen)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return w, x, t, b


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("p_w,p_x,dtype,m", GRID)
def test_dual_kernel_grid(tk, p_w, p_x, dtype, m):
    # ragged: N is not a multiple of the 128-wide tile, K not a multiple of BLOCK_K
    w, x, t, b = _problem(200, 101, m, p_w, p_x, dtype, seed=int(100 * p_w + 10 * p_x) + m, bias=m % 2 == 1)
    ref = reference(x, t, w, b)
    w, x, t, b = _to(DEVICE, w, x, t, b)
    out = torch.full((m, 200), float("nan"), dtype=dtype, device=DEVICE)
    tk.bitmap_matmul(x, t, pack_weight(w), b, out=out)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("m,split_k", [(1, 1), (1, 3), (3, 1), (3, 4), (16, 2), (70, 1), (70, 2)])
@pytest.mark.parametrize("kernel", ["dual", "wsparse", "act"])
def test_paths_and_splits(tk, kernel, m, split_k):
    """Direct store and split-K (decode: last-split reduction; M > 16: workspace + reduce launch), every block
    shape, all three kernels; output and workspace poisoned with NaN beforehand; tickets back at 0."""
    dtype = torch.bfloat16 if m != 3 else torch.float16
    w, x, t, b = _problem(130, 70, m, 0.5, 0.5, dtype, seed=m * 10 + split_k, bias=True)
    ref = reference(x, t, w, b)
    w, x, t, b = _to(DEVICE, w, x, t, b)
    out = torch.full((m, 130), float("nan"), dtype=dtype, device=DEVICE)
    ws = torch.full((split_k, m, 130), float("nan"), device=DEVICE)
    if kernel == "act":
        tk.act_sparse_matmul(x, t, w.t().contiguous(), b, out=out, workspace=ws, split_k=split_k)
    else:
        packed = pack_weight(w)
        if m <= tk.DECODE_MAX_M:  # the decode kernel rounds channels per split to 32: 70 -> 3 splits at most
            assert tk.decode_split(2, 70, 8, split_k)[0] == min(split_k, 3)
        tk.bitmap_matmul(x, t, packed, b, skip_channels=kernel == "dual", out=out, workspace=ws,
                         split_k=split_k)
        assert not packed.tickets.any()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


# every decode variant (padded M 1, 2, 4, 8, 16; bf16, fp16), several splits, odd N and K
# (split None: K < 256 gives one split and the direct store; 3: the last-split reduction)
DECODE_CASES = [(m, dtype, split) for m in (1, 2, 3, 4, 7, 8, 13, 16) for dtype in (torch.bfloat16, torch.float16)
                for split in ((3,) if m not in (1, 16) else (None, 3))]


@pytest.mark.parametrize("m,dtype,split_k", DECODE_CASES)
def test_decode_variants(tk, m, dtype, split_k):
    n, k = 161, 203  # odd: a ragged last tile, splits that end mid-SCAN
    w, x, t, b = _problem(n, k, m, 0.5, 0.5, dtype, seed=m + 100 * (split_k or 0), bias=m % 2 == 0)
    ref = reference(x, t, w, b)
    w, x, t, b = _to(DEVICE, w, x, t, b)
    packed = pack_weight(w)
    out = tk.bitmap_matmul(x, t, packed, b, split_k=split_k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    assert not packed.tickets.any()  # every tile's ticket is reset by its last split
    again = tk.bitmap_matmul(x, t, packed, b, split_k=split_k)
    assert torch.equal(out, again)  # deterministic: fixed summation order, no float atomics


def test_decode_per_token_threshold(tk):
    """Batch > 1: each token multiplies its own thresholded x over the union of live channels (a channel
    live for token 0 only must not leak token 0's value into token 1's row)."""
    n, k = 64, 96
    w, _, _, _ = _problem(n, k, 1, 0.0, 0.0, torch.float16, seed=4)
    x = torch.full((2, k), 0.25)  # everything dead at t = 0.5 ...
    x[0, 5], x[1, 40] = 3.0, -2.0  # ... except one channel per token
    x = x.to(torch.float16)
    t = torch.tensor(0.5)
    out = tk.bitmap_matmul(*_to(DEVICE, x, t), pack_weight(w.to(DEVICE)), split_k=2).cpu()
    want = torch.stack([3.0 * w[:, 5].double(), -2.0 * w[:, 40].double()])
    assert rel_err(out, want) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 4])
def test_all_dead_input(tk, m):
    """No live channel in any split: the output is exactly the bias (or zero), never stale or NaN."""
    n, k = 150, 70
    w, x, _, b = _problem(n, k, m, 0.5, 0.0, torch.bfloat16, seed=m, bias=m == 4)
    t = torch.tensor(float(x.float().abs().max()))  # |x| <= t everywhere
    w, x, t, b = _to(DEVICE, w, x, t, b)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    tk.bitmap_matmul(x, t, pack_weight(w), b, out=out, split_k=3)
    want = torch.zeros(m, n, dtype=torch.bfloat16, device=DEVICE) if b is None else b.expand(m, n)
    assert torch.equal(out, want)


def test_decode_split_sizing(tk):
    """K splits from occupancy: fill one wave of resident programs, at least 256 channels per split."""
    assert tk.programs_per_sm(40, 4) == 12  # 40 regs x 128 threads: 5120 of 65536 regs per program
    assert tk.programs_per_sm(128, 4) == 4
    assert tk.programs_per_sm(32, 4) == 16  # the 64-warp limit
    assert tk.decode_split(96, 4096, 132 * 12) == (16, 256)  # LLaMA-2-7B qkv: min 256 channels per split
    assert tk.decode_split(172, 4096, 132 * 12) == (9, 480)  # gate_up: 9 splits fill 1548 of 1584 slots
    assert tk.decode_split(4, 1000, 8) == (2, 512)  # 2 programs per tile fill the 8 slots
    assert tk.decode_split(4, 100, 8) == (1, 128)  # < 256 channels: one split, direct store
    assert tk.decode_split(4, 100, 8, split_k=3) == (2, 64)  # forced: rounded to 32 channels, no empty split


@pytest.mark.parametrize("kernel", ["wsparse", "act"])
def test_many_m_blocks(tk, kernel):
    """Prefill-sized M: more M blocks than one group of the grouped program order (9 blocks of 64)."""
    m, n, k = 550, 300, 40
    w, x, t, b = _problem(n, k, m, 0.5, 0.3, torch.bfloat16, seed=11, bias=True)
    ref = reference(x, t, w, b)
    w, x, t, b = _to(DEVICE, w, x, t, b)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    if kernel == "act":
        tk.act_sparse_matmul(x, t, w.t().contiguous(), b, out=out, split_k=1)
    else:
        tk.bitmap_matmul(x, t, pack_weight(w), b, skip_channels=False, out=out, split_k=1)
    assert rel_err(out.cpu(), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("kernel", ["dual", "act"])
def test_dead_channels_are_not_read(tk, kernel):
    """NaN in every weight of channels dead for the whole batch: a kernel that read them would output NaN."""
    m, n, k = 4, 150, 64
    w, x, t, b = _problem(n, k, m, 0.5, 0.0, torch.float16, seed=3)
    x[:, ::3] = 0.25  # channels 0, 3, 6, ... dead for every token (t = 0.5)
    x[1, 3] = 0.75  # ... except channel 3, live for token 1 only: the union must keep it
    t = torch.tensor(0.5)
    ref = reference(x, t, w)
    dead = torch.zeros(k, dtype=torch.bool)
    dead[::3] = True
    dead[3] = False
    poisoned = w.clone()
    poisoned[:, dead] = torch.where(w[:, dead] != 0, float("nan"), 0.0).to(w.dtype)
    poisoned, x, t = _to(DEVICE, poisoned, x, t)
    if kernel == "act":
        out = tk.act_sparse_matmul(x, t, poisoned.t().contiguous(), split_k=2)
    else:
        out = tk.bitmap_matmul(x, t, pack_weight(poisoned), split_k=2)
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref) < TOL[torch.float16]


@pytest.mark.parametrize("dtype,t_value,x_value", [
    # t rounds to x's dtype before the comparison: 1.006 -> bf16 1.0078125, so x = 1.0078125 is dropped
    (torch.bfloat16, 1.006, 1.0078125),
    (torch.float16, 1.00049, 1.0009765625),  # fp16: 1.00049 -> 1.0009765625
    (torch.float32, 0.5, 0.5),  # |x| == t is dropped
])
def test_threshold_semantics(tk, dtype, t_value, x_value):
    m, n, k = 2, 64, 40
    gen = torch.Generator().manual_seed(5)
    w = make_weight(n, k, 0.0, dtype, gen)
    x = torch.full((m, k), 3.0)
    x[0, 7], x[1, 20] = x_value, -x_value
    x = x.to(dtype)
    w[:, [7, 20]] = 100.0  # keeping the boundary entries would show
    for t in (torch.tensor(t_value), torch.tensor([t_value]), torch.tensor(t_value).to(dtype)):  # 0-d, [1], x's dtype
        ref = reference(x, t, w)
        assert (x.abs() > t.reshape(()).to(dtype)).sum() == m * k - 2
        out = tk.bitmap_matmul(*_to(DEVICE, x, t), pack_weight(w.to(DEVICE)))
        assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_strided_input(tk):
    """x as a column slice of a wider activation (non-contiguous rows)."""
    w, x, t, _ = _problem(96, 48, 3, 0.5, 0.5, torch.bfloat16, seed=9)
    wide = torch.cat([x, torch.randn(3, 16).to(x.dtype)], 1)
    xs = wide[:, :48]
    assert not xs.is_contiguous()
    out = tk.bitmap_matmul(*_to(DEVICE, xs, t), pack_weight(w.to(DEVICE)))
    assert rel_err(out.cpu(), reference(x, t, w)) < TOL[torch.bfloat16]


LLAMA_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008),  # LLaMA-2-7B qkv, o, gate_up, down
                (6144, 4096), (28672, 4096), (4096, 14336)]  # LLaMA-3-8B qkv, gate_up, down


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("n,k,dtype", [(n, k, torch.bfloat16) for n, k in LLAMA_SHAPES] + [(4096, 4096, torch.float16)])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 64])
def test_real_shapes(tk, n, k, dtype, m):
    w, x, t, b = _to("cuda", *_problem(n, k, m, 0.5, 0.5, dtype, seed=n + k + m, bias=True))
    ref = reference(x, t, w, b)  # float64 on the GPU
    packed = pack_weight(w)
    for skip in (True, False):
        out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        tk.bitmap_matmul(x, t, packed, b, skip_channels=skip, out=out)
        assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(tk.act_sparse_matmul(x, t, w.t().contiguous(), b), ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 4])
def test_cuda_graph_replay(m):
    """Captured once, replayed with new activations and a new threshold value: still exact."""
    from duo_vllm.kernels import dual_sparse_linear

    w, x, t, b = _problem(4096, 4096, m, 0.5, 0.5, torch.bfloat16, seed=m, bias=True)
    packed = pack_weight(w.cuda())
    xs, ts, bs = x.cuda(), t.cuda(), b.cuda()
    dual_sparse_linear(xs, ts, packed, bs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dual_sparse_linear(xs, ts, packed, bs)
    for seed in range(3):
        _, x2, t2, _ = _problem(1, 4096, m, 0.0, 0.3 + 0.2 * seed, torch.bfloat16, seed=100 + seed)
        xs.copy_(x2)
        ts.copy_(t2)
        graph.replay()
        assert rel_err(out.cpu(), reference(x2, t2, w, b)) < TOL[torch.bfloat16]
