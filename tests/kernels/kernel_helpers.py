"""Random dual-sparse problems and the float64 reference."""
import torch

from duo_vllm.format import apply_threshold

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # where the kernels run (interpreted on CPU, see conftest.py)

# ||out - ref|| / ||ref||: fp32 accumulation, so the output rounding dominates (the interpreter truncates
# instead of rounding to nearest for bf16, about 2x the GPU error)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_weight(n: int, k: int, p_w: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    w[w == 0] = 1.0  # the only zeros are the pruned ones
    w[torch.rand(n, k, generator=gen) < p_w] = 0.0
    return w.to(dtype)


def make_input(m: int, k: int, p_x: float, dtype: torch.dtype,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] without exact zeros and a 0-d fp32 threshold that drops a fraction p_x of its entries."""
    x = torch.randn(m, k, generator=gen)
    x[x == 0] = 1.0
    x = x.to(dtype)
    t = torch.quantile(x.float().abs().flatten(), p_x) if p_x > 0 else torch.tensor(0.0)
    return x, t.float()


def reference(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 product with the runtime semantics of duo_vllm.format.apply_threshold (0-d fp32 threshold)."""
    y = apply_threshold(x, t.reshape(())).double() @ w.double().t()
    return y if bias is None else y + bias.double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


H100_SMS = 132


def compile_report(arch: int = 90, n: int = 4096, k: int = 4096, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 64),
                   dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Compile every launch of the kernels ahead of time for sm_<arch>, without a GPU: the decode kernel
    (dual and weight-sparse-only, split-K and direct) for M <= 16, the tl.dot bitmap kernel and the
    activation-only baseline above. Catches GPU-only compile errors the interpreter cannot see and
    reports registers / spills (resource usage, not speed). Needs TRITON_INTERPRET unset."""
    from duo_vllm.kernels import triton_kernels as tk  # here: importing it needs triton

    meta = dict(device="meta")
    packed = tk._meta_packed(n, k, dtype)
    weight_t = torch.empty(k, n, dtype=dtype, **meta)
    report = []
    for m in batches:
        x, t = torch.empty(m, k, dtype=dtype, **meta), torch.empty(1, **meta)
        launches = []
        if m <= tk.DECODE_MAX_M:
            for skip, split in ((True, None), (False, None), (True, 1)):
                launches.append((f"decode skip={skip} split={split or 'auto'}",
                                 tk.decode_call(x, t, packed, None, skip_channels=skip, split_k=split,
                                                slots=H100_SMS * 4)[1]))
        else:
            tensors = (packed.values, packed.masks, packed.offsets)
            for skip in (True, False):
                launches += [(f"bitmap skip={skip}", c) for c in
                             tk._calls(tk._bitmap_kernel, tensors, x, t, n, 128, None, None, None, 1,
                                       SKIP_CHANNELS=skip)[1]]
            launches += [("act_sparse", c) for c in tk._calls(tk._act_sparse_kernel, (weight_t,), x, t, n, 128,
                                                               None, None, None, 1)[1]]
        for name, launch in launches:
            r = tk.aot_compile(launch, arch)
            report.append(dict(kernel=r["kernel"], variant=name, m=m, grid=list(r["grid"]), num_warps=r["num_warps"],
                               registers=r["registers"], stack=r["stack"], local=r["local"], shared=r["shared"]))
    return report
