"""Triton kernels: dual-sparse GEMV/GEMM over the bitmap format, and an activation-only baseline.

Imported lazily (only on CUDA, in tests and in the benchmark): importing it needs a working triton.

Both kernels use one launch shape fixed by (M, N, K) alone, so CUDA graphs can capture them: grid =
(output tiles x M blocks, K splits). Each program walks its K range BLOCK_K channels at a time:
  1. loads x[M block, k block], thresholds it (|x| > t, t rounded to x's dtype like torch does for a
     0-d fp32 threshold) and finds the channels live for at least one token of the block;
  2. reads only those channels' segments (masked loads: a masked-off lane issues no memory request);
  3. accumulates x_t @ w in fp32.
With more than one K split, partials go to an fp32 workspace [splits, M, N] that a second kernel sums
in a fixed order (deterministic, no atomics, every element written, so nothing needs zeroing);
with a single split the first kernel writes the output itself.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

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


def bitmap_matmul(x: torch.Tensor, threshold: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                  *, skip_channels: bool = True, out: torch.Tensor | None = None,
                  workspace: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """out[M, N] = (x with |x| <= t zeroed) @ W^T + bias, W read from the bitmap format.

    skip_channels=True is the dual-sparse decode kernel (channels dead for every token are not read);
    False is the weight-sparse-only path (every segment read; x still thresholded, so still exact).
    threshold: one-element tensor (fp32 or x's dtype) on x's device. out / workspace ([splits, M, N] fp32) may be
    preallocated; split_k overrides the heuristic (tests).
    """
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x must be [M, {packed.in_features}], got {tuple(x.shape)}")
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


def compile_report(arch: int = 90, n: int = 4096, k: int = 4096, batches: tuple[int, ...] = (1, 4, 16, 64),
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Compile every launch of both kernels ahead of time for sm_<arch>, without a GPU.

    Catches GPU-only compile errors the interpreter cannot see, and reports registers / spills from
    the cubin (resource usage, not speed). Needs TRITON_INTERPRET unset and triton's bundled cuobjdump.
    """
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    if _interpreting():
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset (the kernels are interpreted)")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    meta = dict(device="meta")
    weight_t = torch.empty(k, n, dtype=dtype, **meta)
    report, seen = [], set()
    for m in batches:
        x, t = torch.empty(m, k, dtype=dtype, **meta), torch.empty(1, **meta)
        packed_args = (torch.empty(n * k // 2, dtype=dtype, **meta), torch.empty(1, dtype=torch.int32, **meta),
                       torch.empty(1, dtype=torch.int32, **meta))
        split = 2 if m <= 16 else 1  # decode goes through the split-K workspace, prefill stores directly
        variants = [(f"bitmap skip={skip}", _calls(_bitmap_kernel, packed_args, x, t, n, 128, None, None, None,
                                                   split, SKIP_CHANNELS=skip)[1]) for skip in (True, False)]
        variants.append(("act_sparse", _calls(_act_sparse_kernel, (weight_t,), x, t, n, 128, None, None, None,
                                              split)[1]))
        for name, calls in variants:
            for kernel, grid, args, constexprs, num_warps in calls:
                key = (kernel.fn.__name__, tuple(sorted(constexprs.items())), num_warps)
                if key in seen:  # the split-K reduction is shared by the variants
                    continue
                seen.add(key)
                names = kernel.arg_names
                consts = dict(constexprs)
                signature, attrs = {}, {}
                for i, (arg_name, arg) in enumerate(zip(names, args)):
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
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                           capture_output=True, text=True, check=True).stdout
                fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
                report.append(dict(kernel=kernel.fn.__name__, variant=name, m=m, grid=grid, num_warps=num_warps,
                                   registers=int(fields["REG"]), stack=int(fields["STACK"]),
                                   local=int(fields["LOCAL"])))
    return report
