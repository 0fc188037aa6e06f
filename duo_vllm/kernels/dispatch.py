"""``dual_sparse_linear``: the torch custom op ``torch.ops.duo.dual_sparse_linear`` and its path choice.

Paths per call, chosen from (N, K, M) only, so the choice is fixed for a captured CUDA graph:
  "dual"    decode kernel (M <= 16), channels dead for the whole batch skipped
  "wsparse" bitmap kernels reading every segment (weight sparsity only); for M > 16 the "load
            sparse, compute dense" tl.dot kernel, the prefill path when no gemm weight is kept
  "gemm"    F.linear on the thresholded x with the kept dense weight (cuBLAS), only if
            ``keep_gemm_weight``
On CUDA the op needs triton: without it, it raises (``can_serve`` says so beforehand); it never
falls back to torch silently. The CPU registration is plain torch (F.linear on the thresholded x,
the weight unpacked from the bitmap): it serves opcheck / torch.compile tests on CPU machines and
any CPU caller; the project's CPU serving kernel is a separate seam.

Crossovers come from a measured table (``benchmarks/kernel_bench.py --write-table``), JSON:
  {"device": "...", "p_w": 0.5, "p_x": 0.5, "shapes": {"<N>x<K>": {"<M>": "<path>", ...}, ...}}
an M uses the entry of the smallest measured M >= it; shapes or M beyond the table use the default.
DEFAULT, UNTIL GPU MEASUREMENTS EXIST, from the static sm_90 model (benchmarks/kernel_static.py), not a
measurement: "dual" for M <= 4 (model at W50+X50: 0.35x dense time at M = 1, 0.53x at 2, 0.95x at
4), beyond that "gemm" if a gemm weight is kept; without one (the default) "dual" up to M = 16 (the
model has it issue-bound there, 1.3-1.8x dense) and "wsparse" (the tl.dot kernel) beyond.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from duo_vllm.format import apply_threshold
from duo_vllm.kernels.packing import PackedWeight, unpack_weight

PATHS = ("dual", "wsparse", "gemm")
DEFAULT_DUAL_MAX_M = 4  # with a gemm weight kept; without one the decode kernel serves M <= 16
# the table the benchmark writes and the lead commits; DUO_CROSSOVER_TABLE overrides the location
TABLE_PATH = Path(os.environ.get("DUO_CROSSOVER_TABLE", Path(__file__).with_name("crossover.json")))


@functools.cache
def load_table(path: str | os.PathLike = TABLE_PATH) -> dict[tuple[int, int], list[tuple[int, str]]]:
    """{(N, K): [(M, path), ...] sorted by M}; empty when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    table = {}
    for shape, by_m in raw["shapes"].items():
        n, k = (int(v) for v in shape.split("x"))
        # "dense" is what tables written before the rename call the "gemm" path
        entries = sorted((int(m), "gemm" if p == "dense" else p) for m, p in by_m.items())
        bad = [p for _, p in entries if p not in PATHS]
        if bad:
            raise ValueError(f"{path}: shape {shape}: unknown path(s) {bad}, expected one of {PATHS}")
        table[(n, k)] = entries
    return table


def choose_path(m: int, n: int, k: int, has_gemm_weight: bool = True,
                table: dict[tuple[int, int], list[tuple[int, str]]] | None = None) -> str:
    """Which path serves an [m, k] x [k, n] product (see module docstring)."""
    table = load_table() if table is None else table
    path = None
    for m_max, p in table.get((n, k), ()):
        if m <= m_max:
            path = p
            break
    if path is None:
        dual_max = DEFAULT_DUAL_MAX_M if has_gemm_weight else 16
        path = "dual" if m <= dual_max else "gemm"
    if path == "gemm" and not has_gemm_weight:
        path = "wsparse"
    return path


def _apply_threshold(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # the threshold rounded to x's dtype, which is what a 0-d fp32 threshold gets by type promotion
    return apply_threshold(x, threshold.reshape(()).to(x.dtype))


def _packed(values, masks, offsets, tickets, n: int, k: int, block_n: int) -> PackedWeight:
    return PackedWeight(values=values, masks=masks, offsets=offsets, col_nnz=masks.new_empty(0), gemm_weight=None,
                        tickets=tickets, out_features=n, in_features=k, block_n=block_n)


def _torch_impl(x, threshold, values, masks, offsets, tickets, gemm_weight, bias, out_features: int, block_n: int):
    w = gemm_weight if gemm_weight is not None else unpack_weight(_packed(values, masks, offsets, tickets, out_features,
                                                              x.shape[1], block_n))
    return F.linear(_apply_threshold(x, threshold), w, bias)


@functools.cache
def _triton_kernels():
    """The triton module, or None where triton cannot be imported (e.g. vLLM's CPU build)."""
    try:
        from duo_vllm.kernels import triton_kernels
    except Exception:  # ImportError, or a placeholder triton without triton.language
        return None
    return triton_kernels


def _cuda_impl(x, threshold, values, masks, offsets, tickets, gemm_weight, bias, out_features: int, block_n: int):
    k = x.shape[1]
    path = choose_path(x.shape[0], out_features, k, gemm_weight is not None)
    if x.shape[0] == 0:
        return x.new_empty(0, out_features)
    if path == "gemm":
        return F.linear(_apply_threshold(x, threshold), gemm_weight, bias)
    tk = _triton_kernels()
    if tk is None:
        raise RuntimeError("duo: the dual-sparse CUDA kernels need triton, which cannot be imported here "
                           "(check duo_vllm.kernels.can_serve before packing a layer)")
    packed = _packed(values, masks, offsets, tickets, out_features, k, block_n)
    return tk.bitmap_matmul(x, threshold, packed, bias, skip_channels=path == "dual")


def _fake_impl(x, threshold, values, masks, offsets, tickets, gemm_weight, bias, out_features: int, block_n: int):
    return x.new_empty(x.shape[0], out_features)


# kept alive at module level: dropping the Library object would unregister the op
_lib = torch.library.Library("duo", "FRAGMENT")
_lib.define(
    # tickets: per-tile split-K counters the decode kernel increments and resets to 0 before it exits, so
    # they hold the same value between launches (not declared as mutated: nothing observes a change)
    "dual_sparse_linear(Tensor x, Tensor threshold, Tensor values, Tensor masks, Tensor offsets, "
    "Tensor tickets, Tensor? gemm_weight, Tensor? bias, int out_features, int block_n) -> Tensor"
)
_lib.impl("dual_sparse_linear", _cuda_impl, "CUDA")
_lib.impl("dual_sparse_linear", _torch_impl, "CPU")
torch.library.register_fake("duo::dual_sparse_linear", _fake_impl, lib=_lib)


def dual_sparse_linear(x: torch.Tensor, threshold: torch.Tensor, packed: PackedWeight,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = apply_threshold(x, t) @ W^T + bias for x [..., K]; returns [..., N] in x's dtype.

    threshold: one-element tensor (0-d or [1]; fp32 or x's dtype) on x's device; it is rounded to x's
    dtype before the comparison |x| > t, exactly like ``duo_vllm.format.apply_threshold`` with a 0-d
    fp32 tensor (torch compares a bf16 x with a 0-d fp32 t in bf16).
    Exact for every token of a batch. No host sync and a launch shape fixed by the shapes: safe to
    capture in a CUDA graph and opaque to torch.compile.
    """
    # shape/dtype/device checks only (no data access): the kernels read raw pointers
    if x.shape[-1] != packed.in_features or x.dtype != packed.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not match the packed weight "
                         f"[{packed.out_features}, {packed.in_features}] {packed.dtype}")
    if threshold.numel() != 1 or threshold.device != x.device:
        raise ValueError(f"threshold must be one value on {x.device}, "
                         f"got {tuple(threshold.shape)} on {threshold.device}")
    lead = x.shape[:-1]
    y = torch.ops.duo.dual_sparse_linear(
        x.reshape(-1, x.shape[-1]), threshold, packed.values, packed.masks, packed.offsets, packed.tickets,
        packed.gemm_weight, bias, packed.out_features, packed.block_n,
    )
    return y.reshape(*lead, packed.out_features)


def can_serve(weight_shape, dtype: torch.dtype, device) -> tuple[bool, str]:
    """Whether the Triton kernels can serve a linear of ``weight_shape`` [N, K] (after TP sharding) in
    ``dtype`` on ``device``, and if not, why (one sentence). Never imports the kernels themselves."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the Triton kernels run on CUDA only, not {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"the Triton kernels serve bfloat16 and float16 only, not {dtype}"
    if len(weight_shape) != 2 or min(weight_shape) < 1:
        return False, f"weight must be [N, K] with N, K >= 1, got {tuple(weight_shape)}"
    n, k = (int(v) for v in weight_shape)
    if n * k >= 2**31:
        return False, f"[{n}, {k}] has too many elements for the int32 offsets of the bitmap format"
    try:
        import triton
        import triton.language  # noqa: F401  (a placeholder triton lacks it)
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton cannot be imported ({type(e).__name__}: {e})"
    major = getattr(triton, "__version__", "0").split(".")[0]
    if not major.isdigit() or int(major) < 3:
        return False, f"triton {getattr(triton, '__version__', '?')} is too old (needs >= 3)"
    return True, ""
