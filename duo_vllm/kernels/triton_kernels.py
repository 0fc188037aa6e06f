"""Triton kernels: dual-sparse GEMV/GEMM over the bitmap format, and an activation-only baseline.

Imported lazily (only on CUDA, in tests and in the benchmark): importing it needs a working triton.

Every launch shape is fixed by (M, N, K) alone, so CUDA graphs can capture them.

Decode, M <= 16 (``_decode_kernel``; the dual-sparse path vLLM runs every decode step). Grid = (output
tiles, K splits), one M block. Each program:
  1. compacts the live channels of its K split once: loads x[:, split] in SCAN-channel chunks,
     thresholds it (|x| > t, t rounded to x's dtype like torch does for a 0-d fp32 threshold), keeps a
     channel if any token needs it (the union) and writes the channel list and the thresholded x (fp32,
     per token: exact for every token) to a per-split scratch, padded to a whole CHUNK with the first
     live channel at x = 0 so the hot loop needs no masks. Every tile of a split writes the same values
     (a benign, identical-value race), so no pre-pass launch is needed;
  2. loops over the live channels only, CHUNK at a time: tensors are [words, channels, bits] with the
     32 lanes on the bits of a mask word and the warps on channels; the value of output b is the 2-byte
     gather vals[offset + prefix(word) + popc(word & (2^b - 1))], unmasked (a clear bit reads the next
     stored value and its FMA is predicated off), which the coalescer turns into the same full-sector
     requests a contiguous vector load would issue (placing vector-loaded values in output order would
     cost a shuffle per value). Per-word work (mask load, popcount, prefix): with one warp per program
     (M <= 2) done once per word, spread over the lanes, and handed over through shared memory behind a
     warp-local barrier; with 4 warps every lane loads its words (one broadcast request per warp) and
     counts them itself, so there is no CTA barrier, shuffle or shared memory in the loop;
  3. with one split, stores the output; with more, stores its fp32 partial [M, BLOCK_N] into the
     workspace [splits, M, N], takes a ticket (atomic, acq_rel, per output tile) and, if it is the
     last split of the tile, sums the splits in index order (deterministic, no second launch), adds
     the bias, stores the output and resets the ticket to 0 for the next launch.
K splits are sized from occupancy (registers x threads per SM) so one wave fills the GPU, with at
least 256 channels per split. Fused q/k/v and gate/up are single vLLM linears (one packed weight, one
launch), so x is read and its live channels compacted once per group, not once per projection.

Prefill / M > 16 (``_bitmap_kernel``): "load sparse, compute dense": BLOCK_K channels per iteration are
expanded from the bitmap into a dense tile in registers and multiplied with tl.dot (tensor cores), so
no dense copy of W is needed. ``_act_sparse_kernel`` is the TEAL-style baseline on a dense W^T.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from duo_vllm.kernels.packing import PackedWeight


@triton.jit
def _threshold_value(t_ptr, dtype: tl.constexpr):
    """The fp32 threshold rounded to nearest-even in x's dtype, as torch compares x (bf16) > t (0-d fp32)."""
    t = tl.load(t_ptr).to(tl.float32)
    if dtype == tl.bfloat16:
        # by hand: the interpreter's fp32 -> bf16 cast truncates, and the keep decision must match torch
        b = t.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        t = b.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        t = t.to(tl.float16).to(tl.float32)
    return t


@triton.jit
def _threshold_block(x_ptr, t_ptr, rm, rk, M, K, stride_xm, stride_xk, SKIP_CHANNELS: tl.constexpr):
    """x[rm, rk] with |x| <= t zeroed, and the channels of rk that must be read."""
    k_ok = rk < K
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
    t = _threshold_value(t_ptr, x_ptr.dtype.element_ty)
    keep = tl.abs(x.to(tl.float32)) > t
    x = tl.where(keep, x, 0.0)
    if SKIP_CHANNELS:
        live = (tl.max(keep.to(tl.int32), axis=0) > 0) & k_ok
    else:
        live = k_ok
    return x, live


@triton.jit
def _zeros_acc(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr):
    if BLOCK_M == 1 and not USE_DOT:
        return tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # GEMV: reduce over channels once, at the end
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _accumulate(acc, x, w, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    if USE_DOT:
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    elif BLOCK_M == 1:
        acc += tl.reshape(x, (x.shape[1], 1)).to(tl.float32) * w.to(tl.float32)
    else:
        # a few tokens: broadcast FMA + reduction over channels (no padding of M to 16 for tl.dot)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _finish_acc(acc, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr):
    if BLOCK_M == 1 and not USE_DOT:
        return tl.sum(acc, axis=0)[None, :]
    else:
        return acc


@triton.jit
def _store(acc, rm, rn, pid_s, M, N, bias_ptr, out_ptr, ws_ptr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr):
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm64[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(ws_ptr + (pid_s * M + rm64[:, None]) * N + rn[None, :], acc, mask=ok)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(M block, output tile) of this program. Grouped order: GROUP_M M blocks sweep the output tiles
    together, so each weight tile is read from HBM once per group rather than once per M block (prefill);
    with one M block (decode) it is just pid -> tile."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    in_group = pid % (GROUP_M * tiles_n)
    return first_m + in_group % group_m, in_group // group_m


@triton.jit
def _bitmap_kernel(x_ptr, t_ptr, vals_ptr, masks_ptr, offs_ptr, bias_ptr, out_ptr, ws_ptr,
                   M, N, K, stride_xm, stride_xk, k_per_split,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SKIP_CHANNELS: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                   DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, BLOCK_N)  # output within the tile
    acc = _zeros_acc(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x, live = _threshold_block(x_ptr, t_ptr, rm, rk, M, K, stride_xm, stride_xk, SKIP_CHANNELS)
        seg = pid_n * K + rk  # segment (tile, channel)
        start = tl.load(offs_ptr + seg, mask=live, other=0).to(tl.int64)
        word = tl.load(masks_ptr + seg[:, None] * (BLOCK_N // 32) + (rb // 32)[None, :],
                       mask=live[:, None], other=0)
        bit = (word >> (rb % 32)[None, :]) & 1
        rank = tl.cumsum(bit, axis=1) - bit  # position of each nonzero inside its segment
        w = tl.load(vals_ptr + start[:, None] + rank, mask=bit != 0, other=0.0)
        acc = _accumulate(acc, x, w, BLOCK_M, USE_DOT, DOT_FP32)
    _store(_finish_acc(acc, BLOCK_M, USE_DOT), rm, pid_n * BLOCK_N + rb, pid_s, M, N,
           bias_ptr, out_ptr, ws_ptr, DIRECT, HAS_BIAS)


@triton.jit
def _popc(v, INTERP: tl.constexpr):
    """Population count of int32 words (libdevice on the GPU; SWAR under the interpreter, which lacks it)."""
    if INTERP:
        u = v.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        return ((u * 0x01010101) >> 24).to(tl.int32)
    else:
        return libdevice.popc(v)


# splits / k_per_split are not specialized (divisibility by 16 changed the hot loop's layouts once; the
# code must not depend on how the K range is cut)
@triton.jit(do_not_specialize=["k_per_split", "splits"])
def _decode_kernel(x_ptr, t_ptr, vals_ptr, masks_ptr, offs_ptr, bias_ptr, out_ptr, ws_ptr, list_ptr, xs_ptr,
                   ticket_ptr, M, N, K, stride_xm, stride_xk, k_per_split, splits,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SCAN: tl.constexpr,
                   SKIP_CHANNELS: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SHARE_WORDS: tl.constexpr, INTERP: tl.constexpr):
    NW: tl.constexpr = BLOCK_N // 32
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    t = _threshold_value(t_ptr, x_ptr.dtype.element_ty)
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    region = pid_s * (k_per_split + CHUNK)   # this split's scratch (shared by all its tiles), CHUNK of padding
    lst = list_ptr + region                  # live channels
    xs = xs_ptr + region * BLOCK_M           # their thresholded x, fp32 [live, BLOCK_M]
    # 1. compact the live channels of [k_begin, k_end) once (every tile of the split writes the same list)
    n_live = 0
    first = K
    for c0 in range(k_begin, k_end, SCAN):
        rk = c0 + tl.arange(0, SCAN)
        in_k = rk < k_end
        xv = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=(rm < M)[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        keep = tl.abs(xv) > t
        xv = tl.where(keep, xv, 0.0)
        if SKIP_CHANNELS:
            live = (tl.max(keep.to(tl.int32), axis=0) > 0) & in_k
        else:
            live = in_k
        li = live.to(tl.int32)
        pos = n_live + tl.cumsum(li, axis=0) - li
        tl.store(lst + pos, rk, mask=live)
        tl.store(xs + pos[None, :] * BLOCK_M + rm[:, None], xv, mask=live[None, :])
        n_live += tl.sum(li, axis=0)
        first = tl.minimum(first, tl.min(tl.where(live, rk, K), axis=0))
    # pad the list to a whole CHUNK with the first live channel and x = 0: the hot loop needs no masks
    rc = tl.arange(0, CHUNK)
    tl.store(lst + n_live + rc, tl.zeros((CHUNK,), dtype=tl.int32) + first)
    tl.store(xs + (n_live + rc[None, :]) * BLOCK_M + rm[:, None], tl.zeros((BLOCK_M, CHUNK), dtype=tl.float32))
    tl.debug_barrier()
    # 2. walk only the live channels, CHUNK at a time
    rj = tl.arange(0, NW)
    rb = tl.arange(0, 32)
    bitv = 1 << rb
    below = bitv - 1                        # bits of the outputs before this lane's in a word
    # tensors are [NW, CHUNK, 32] (word, channel, bit): lanes on bits, warps on channels, the words of a
    # segment in one thread, so the per-word prefix counts need no communication
    acc = tl.zeros((BLOCK_M, NW, CHUNK, 32), dtype=tl.float32)
    for i0 in range(0, n_live, CHUNK):
        ic = i0 + rc
        kk = tl.load(lst + ic)
        xc = tl.load(xs + ic[None, :] * BLOCK_M + rm[:, None])  # [BLOCK_M, CHUNK]
        seg = pid_n * K + kk
        start = tl.load(offs_ptr + seg)
        seg3 = seg[None, :, None]
        # every lane loads the words of its segments (one request per warp: all lanes read the same address)
        wp = masks_ptr + seg3 * NW + rj[:, None, None]
        if SHARE_WORDS:
            # one warp per program: the [NW, CHUNK, 1] load is spread over the lanes (one word each), the
            # per-word popcount / prefix is done once, and the lanes that need it get it through shared
            # memory; with one warp the barrier of that exchange is warp-local
            w3 = tl.load(wp)
        else:
            # several warps: loaded at the full [NW, CHUNK, 32] shape (same address on all lanes), so it
            # keeps the hot loop's layout and needs no cross-warp exchange (no CTA barrier in the loop)
            w3 = tl.load(tl.broadcast_to(wp, (NW, CHUNK, 32)))
        cnt = _popc(w3, INTERP)
        base = start[None, :, None] + tl.cumsum(cnt, axis=0) - cnt        # first value of each word
        rank = base + _popc(w3 & below[None, None, :], INTERP)
        hit = (w3 & bitv[None, None, :]) != 0
        # unmasked: a lane whose bit is clear reads the next stored value (values has one padding element
        # at the end), and its FMA is predicated off; a masked load would cost a register clear per element
        v = tl.load(vals_ptr + rank.to(tl.uint32)).to(tl.float32)  # [NW, CHUNK, 32]
        acc = tl.where(hit[None, :, :, :], acc + xc[:, None, :, None] * v[None, :, :, :], acc)
    part = tl.reshape(tl.sum(acc, axis=2), (BLOCK_M, BLOCK_N))
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_out = (rm < M)[:, None] & (rn < N)[None, :]
    if DIRECT:
        if HAS_BIAS:
            part += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], part.to(out_ptr.dtype.element_ty), mask=ok_out)
    else:
        tl.store(ws_ptr + (pid_s * M + rm[:, None]) * N + rn[None, :], part, mask=ok_out, cache_modifier=".cg")
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:  # the last split of this tile: sum every split in order (deterministic)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(splits):
                total += tl.load(ws_ptr + (s * M + rm[:, None]) * N + rn[None, :], mask=ok_out, other=0.0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], total.to(out_ptr.dtype.element_ty), mask=ok_out)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)  # ready for the next launch (CUDA graph replays)


@triton.jit
def _act_sparse_kernel(x_ptr, t_ptr, wt_ptr, bias_ptr, out_ptr, ws_ptr,
                       M, N, K, stride_xm, stride_xk, k_per_split,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                       DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr):
    """TEAL-style baseline: dense W^T [K, N] (input-channel-major), rows of dead channels not read."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _zeros_acc(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT)
    k_begin = pid_s * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x, live = _threshold_block(x_ptr, t_ptr, rm, rk, M, K, stride_xm, stride_xk, True)
        w = tl.load(wt_ptr + rk.to(tl.int64)[:, None] * N + rn[None, :],
                    mask=live[:, None] & (rn < N)[None, :], other=0.0)
        acc = _accumulate(acc, x, w, BLOCK_M, USE_DOT, DOT_FP32)
    _store(_finish_acc(acc, BLOCK_M, USE_DOT), rm, rn, pid_s, M, N, bias_ptr, out_ptr, ws_ptr, DIRECT, HAS_BIAS)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLITS, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ws_ptr + s * M * N + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + idx % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _config(m: int, n_tiles: int, k: int, device: torch.device, split_k: int | None) -> dict:
    """Block sizes and K split from the shape alone (never from data). Untuned: no GPU measurements yet."""
    if m == 1:
        block_m, block_k, use_dot, num_warps = 1, 32, False, 8
    elif m <= 4:
        # broadcast FMA: BLOCK_M * BLOCK_K * BLOCK_N products live in registers
        block_m, block_k, use_dot, num_warps = triton.next_power_of_2(m), 16, False, 4
    else:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        block_k, use_dot, num_warps = 32, True, (4 if block_m == 16 else 8)
    m_blocks = triton.cdiv(m, block_m)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:
        # aim for about 4 programs per SM so the memory system stays busy
        target = 4 * (_num_sms(device.index or 0) if device.type == "cuda" else 8)
        split_k = max(1, min(k_blocks, triton.cdiv(target, n_tiles * m_blocks)))
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    return dict(block_m=block_m, block_k=block_k, use_dot=use_dot, num_warps=num_warps,
                m_blocks=m_blocks, split_k=split_k, k_per_split=k_per_split)


def _calls(kernel, tensors: tuple, x: torch.Tensor, threshold: torch.Tensor, n: int, block_n: int,
           bias: torch.Tensor | None, out: torch.Tensor | None, workspace: torch.Tensor | None,
           split_k: int | None, **flags) -> tuple[torch.Tensor, list[tuple]]:
    """The output and the launches (kernel, grid, args, constexprs, num_warps) computing it."""
    m, k = x.shape
    cfg = _config(m, triton.cdiv(n, block_n), k, x.device, split_k)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    direct = cfg["split_k"] == 1
    if not direct and workspace is None:
        workspace = torch.empty(cfg["split_k"], m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): upcast there
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _interpreting())
    main = (
        kernel, (triton.cdiv(n, block_n) * cfg["m_blocks"], cfg["split_k"]),
        (x, threshold, *tensors, bias_arg, out, workspace if not direct else out,
         m, n, k, x.stride(0), x.stride(1), cfg["k_per_split"]),
        dict(BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_K=cfg["block_k"], USE_DOT=cfg["use_dot"],
             DOT_FP32=dot_fp32, DIRECT=direct, HAS_BIAS=bias is not None, GROUP_M=8, **flags),
        cfg["num_warps"],
    )
    if direct:
        return out, [main]
    block = 1024
    reduce = (_splitk_reduce_kernel, (triton.cdiv(m * n, block),), (workspace, bias_arg, out, m, n, cfg["split_k"]),
              dict(BLOCK=block, HAS_BIAS=bias is not None), 4)
    return out, [main, reduce]


def _run(out: torch.Tensor, calls: list[tuple]) -> torch.Tensor:
    for kernel, grid, args, constexprs, num_warps in calls:
        kernel[grid](*args, **constexprs, num_warps=num_warps)
    return out


DECODE_MAX_M = 16
SCAN = 128  # channels per compaction step
# decode batch (padded to a power of two) -> (channels per hot-loop iteration, warps per program). From
# the sm_90 SASS (benchmarks/kernel_static.py): the most elements per thread and iteration without
# spills. M <= 2: one warp per program, 8 channels x 4 words per thread, the per-word work shared over
# the lanes (SHARE_WORDS); M = 1 then needs 128 registers (16 programs = 16 warps per SM) and issues
# 0.34 warp instructions per visited element (4 warps x 16 channels with every lane doing its own word
# work: 40 registers, 0.42). Larger M: 4 warps, words broadcast; more tokens need more accumulator
# registers per channel, so fewer channels per iteration.
DECODE_CONFIG = {1: (8, 1), 2: (8, 1), 4: (16, 4), 8: (4, 4), 16: (4, 4)}


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int = 0) -> int:
    """Resident programs per SM on sm_90: 64K registers (allocated per warp in units of 256), 64 warps,
    32 blocks, 228 KiB shared memory (1 KiB reserved per block)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * num_warps)
    by_smem = (228 * 1024) // (shared_bytes + 1024)
    return max(1, min(by_regs, 64 // num_warps, by_smem, 32))


def decode_split(n_tiles: int, k: int, slots: int, split_k: int | None = None,
                 min_k_per_split: int = 256) -> tuple[int, int]:
    """(splits, channels per split) for a decode launch: as many K splits as fill one wave of ``slots``
    resident programs (SMs x programs per SM) over the n_tiles output tiles, but at least
    min_k_per_split channels per split (each program's fixed cost: prologue, compaction, partial store
    and ticket, is then small beside its hot loop), never an empty split."""
    if split_k is None:
        split_k = max(1, min(slots // n_tiles, triton.cdiv(k, min_k_per_split)))
    split_k = max(1, min(split_k, triton.cdiv(k, 32)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), 32) * 32
    return triton.cdiv(k, k_per_split), k_per_split


def decode_constexprs(m: int, block_n: int, skip_channels: bool, direct: bool, has_bias: bool) -> dict:
    block_m = triton.next_power_of_2(m)
    chunk, warps = DECODE_CONFIG[block_m]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, SCAN=SCAN, SKIP_CHANNELS=skip_channels,
                DIRECT=direct, HAS_BIAS=has_bias, SHARE_WORDS=warps == 1, INTERP=_interpreting())


def decode_warps(m: int) -> int:
    return DECODE_CONFIG[triton.next_power_of_2(m)][1]


@functools.cache
def _decode_registers(device_index: int, block_n: int, block_m: int, skip: bool, direct: bool, has_bias: bool,
                      dtype: torch.dtype) -> int:
    """Registers per thread of the compiled decode kernel on this GPU (compiled here once per variant)."""
    cst = decode_constexprs(block_m, block_n, skip, direct, has_bias)
    dev = torch.device("cuda", device_index)
    x = torch.empty(block_m, 32, dtype=dtype, device=dev)
    i32, f32 = torch.empty(64, dtype=torch.int32, device=dev), torch.empty(64, dtype=torch.float32, device=dev)
    compiled = _decode_kernel.warmup(x, f32, x, i32, i32, x, x, f32, i32, f32, i32,
                                     block_m, 32, 32, 32, 1, 32, 1, grid=(1,), **cst, num_warps=decode_warps(block_m))
    compiled._init_handles()
    return int(compiled.n_regs)


def decode_call(x: torch.Tensor, threshold: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                out: torch.Tensor | None = None, workspace: torch.Tensor | None = None, *,
                skip_channels: bool = True, split_k: int | None = None, slots: int | None = None):
    """(out, launch) of the decode kernel, launch = (kernel, grid, args, constexprs, num_warps).

    slots: resident programs the GPU holds at once (default: SMs x programs_per_sm of the compiled
    kernel on CUDA; 8 elsewhere, which only matters for the interpreter's split-K coverage)."""
    m, k = x.shape
    n, block_n = packed.out_features, packed.block_n
    tiles = triton.cdiv(n, block_n)
    if slots is None:
        if x.device.type == "cuda":
            regs = _decode_registers(x.device.index or 0, block_n, triton.next_power_of_2(m), skip_channels,
                                     False, bias is not None, x.dtype)
            slots = _num_sms(x.device.index or 0) * programs_per_sm(regs, decode_warps(m))
        else:
            slots = 8
    splits, k_per_split = decode_split(tiles, k, slots, split_k)
    # one split stores directly, except at M = 16, whose direct-store variant ptxas compiles with an
    # 8-byte spill (128 registers); the ticket epilogue with one split is spill-free and just as exact
    direct = splits == 1 and m <= 8
    cst = decode_constexprs(m, block_n, skip_channels, direct, bias is not None)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if workspace is None:
        workspace = out if direct else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    slots_per_split = k_per_split + cst["CHUNK"]
    live = torch.empty(splits * slots_per_split, dtype=torch.int32, device=x.device)
    xs = torch.empty(splits * slots_per_split * cst["BLOCK_M"], dtype=torch.float32, device=x.device)
    args = (x, threshold, packed.values, packed.masks, packed.offsets, bias if bias is not None else out, out,
            workspace, live, xs, packed.tickets, m, n, k, x.stride(0), x.stride(1), k_per_split, splits)
    return out, (_decode_kernel, (tiles, splits), args, cst, decode_warps(m))


def bitmap_matmul(x: torch.Tensor, threshold: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                  *, skip_channels: bool = True, out: torch.Tensor | None = None,
                  workspace: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """out[M, N] = (x with |x| <= t zeroed) @ W^T + bias, W read from the bitmap format.

    M <= 16: the decode kernel (one launch); larger M: the "load sparse, compute dense" tl.dot kernel.
    skip_channels=True skips channels dead for the whole batch (dual sparsity); False reads every
    segment (weight sparsity only; x still thresholded, so still exact).
    threshold: one-element tensor (fp32 or x's dtype) on x's device. out / workspace ([splits, M, N] fp32) may be
    preallocated; split_k overrides the occupancy heuristic (tests).
    """
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x must be [M, {packed.in_features}], got {tuple(x.shape)}")
    if 0 < x.shape[0] <= DECODE_MAX_M:
        out, launch = decode_call(x, threshold, packed, bias, out, workspace, skip_channels=skip_channels,
                                  split_k=split_k)
        return _run(out, [launch])
    return _run(*_calls(_bitmap_kernel, (packed.values, packed.masks, packed.offsets), x, threshold,
                        packed.out_features, packed.block_n, bias, out, workspace, split_k,
                        SKIP_CHANNELS=skip_channels))


def act_sparse_matmul(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor,
                      bias: torch.Tensor | None = None, *, block_n: int = 128, out: torch.Tensor | None = None,
                      workspace: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """Activation-only baseline (TEAL-style) on a dense, input-channel-major weight_t [K, N] (contiguous)."""
    if x.dim() != 2 or weight_t.dim() != 2 or x.shape[1] != weight_t.shape[0] or not weight_t.is_contiguous():
        raise ValueError(f"need x [M, K] and contiguous weight_t [K, N], got {tuple(x.shape)}, {tuple(weight_t.shape)}")
    return _run(*_calls(_act_sparse_kernel, (weight_t,), x, threshold, weight_t.shape[1], block_n,
                        bias, out, workspace, split_k))


def _bin(tool: str) -> str:
    import os

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def aot_compile(launch: tuple, arch: int = 90) -> dict:
    """Compile one launch (kernel, grid, args, constexprs, num_warps) ahead of time for sm_<arch>, no GPU.

    Integer arguments are specialized as the runtime launcher does (1 -> constant, multiples of 16 ->
    divisibility hint), tensors (meta tensors are fine) get the 16-byte alignment hint. Returns the
    cubin, SASS (cuobjdump), TTGIR and the resource usage: registers, stack, local (spill) bytes, shared.
    Needs TRITON_INTERPRET unset and the cuobjdump bundled with triton.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    if _interpreting():
        raise RuntimeError("aot_compile needs TRITON_INTERPRET unset (the kernels are interpreted)")
    kernel, grid, args, constexprs, num_warps = launch
    consts = dict(constexprs)
    signature, attrs = {}, {}
    fixed = set(kernel.do_not_specialize)
    for i, (arg_name, arg) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(arg, int) and (i in fixed or arg_name in fixed):
            signature[arg_name] = "i32"
            continue
        if isinstance(arg, int) and arg == 1:  # triton specializes 1 into a constant
            consts[arg_name] = 1
            continue
        signature[arg_name] = mangle_type(arg)
        if isinstance(arg, torch.Tensor) or arg % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for c in consts:
        signature[c] = "constexpr"
    compiled = triton.compile(ASTSource(kernel, signature, consts, attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return dict(kernel=kernel.fn.__name__, grid=grid, num_warps=num_warps, registers=int(fields["REG"]),
                stack=int(fields["STACK"]), local=int(fields["LOCAL"]), shared=int(fields["SHARED"]),
                sass=sass, ttgir=compiled.asm["ttgir"], ptx=compiled.asm["ptx"], cubin=compiled.asm["cubin"])


def _meta_packed(n: int, k: int, dtype: torch.dtype, block_n: int = 128, p_w: float = 0.5) -> PackedWeight:
    """A PackedWeight of meta tensors with the real shapes (for compiling, never for running)."""
    meta = dict(device="meta")
    tiles = triton.cdiv(n, block_n)
    return PackedWeight(values=torch.empty(int(n * k * (1 - p_w)) + 1, dtype=dtype, **meta),
                        masks=torch.empty(tiles, k, block_n // 32, dtype=torch.int32, **meta),
                        offsets=torch.empty(tiles, k, dtype=torch.int32, **meta),
                        col_nnz=torch.empty(k, dtype=torch.int32, **meta), gemm_weight=None,
                        tickets=torch.empty(tiles, dtype=torch.int32, **meta),
                        out_features=n, in_features=k, block_n=block_n)

