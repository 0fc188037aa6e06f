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
