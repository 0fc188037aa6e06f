"""The CPU dual-sparse kernel (fp32): ``torch.ops.duo.cpu_sparse_linear``, its format and its build.

The C++ source (``cpu_kernel.cpp``, format described there) is compiled on first use by torch's
extension builder into ``~/.cache/duo-vllm/cpu_kernel/`` (``DUO_CPU_KERNEL_CACHE`` overrides) and
loaded as a torch op library; ``make setup`` builds it once so that no server pays the compile.

One op serves every batch size, so the choice never depends on Python control flow that
torch.compile would freeze: up to ``max_sparse_m`` tokens it runs the sparse kernel (only the weights
of live input channels, only the nonzeros, threads over 32-output tiles, fp32 accumulation in
channel order); above it, the thresholded x goes through vLLM's own oneDNN GEMM (the one vLLM's
dense model uses) when a handle is given. The crossover comes from ``cpu_crossover.json``, measured by
``benchmarks/cpu_kernel_bench.py --write-table`` and keyed by the CPU's model name and the instruction
set the kernel runs with.

Instruction set: AVX-512 (one masked expand per 16 outputs) or AVX2 + FMA (a permute table per 8) when
the CPU has them (torch's own CPU capability check; the C++ side checks again), else a portable scalar
path. ``DUO_CPU_ISA=avx2|portable`` forces a lesser one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from duo_vllm.files import write_text_atomic

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
TABLE_PATH = Path(__file__).with_name("cpu_crossover.json")
WORD = 32  # outputs per mask word
# Outputs per tile at most. Wide, because skipped reads pay only in long runs: on the 2-core EPYC VMs a
# random 60 % of 1 KiB chunks took as long to read as all of them, of 4 KiB chunks 0.7 of the time
# (huge pages; a live channel's segment is about width * (1 - p_w) * 4 bytes). Its accumulators, width
# floats per token, stay in L2.
MAX_TILE = 4096
PAD = 16  # zeros after the last segment: the SIMD paths load 8 (AVX2) or 16 (AVX-512) floats from any position
# No measured crossover for this CPU: the sparse kernel only for single-token decode, where reading
# fewer bytes wins on any memory-bound machine; everything larger goes to the dense GEMM.
UNMEASURED_MAX_SPARSE_M = 1


class CpuKernelUnavailable(RuntimeError):
    """The C++ kernel could not be built or loaded here (the message says why)."""


def _cache_dir() -> Path:
    """One build per torch, Python and source text. Keyed by the text, not the checkout: the build command names
    the source's path, so checkouts sharing one build would rebuild it each time another had (24 s per server
    start on the 2-core VMs)."""
    root = os.environ.get("DUO_CPU_KERNEL_CACHE") or Path.home() / ".cache" / "duo-vllm" / "cpu_kernel"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return Path(root) / f"torch-{torch.__version__}-py{platform.python_version()}-{digest}"


@functools.cache
def load() -> None:
    """Compile (once per machine, torch version and source) and load the op library; raises CpuKernelUnavailable."""
    from torch.utils import cpp_extension

    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / SOURCE.name  # the build's own copy: the same path whichever checkout builds it
    if not source.is_file():
        write_text_atomic(source, SOURCE.read_text(encoding="utf-8"))
    try:
        # -fopenmp: at::parallel_for's OpenMP pragmas; the soname libgomp.so.1 resolves to torch's own
        # runtime (already loaded), so the kernel shares torch's (and vLLM's bound) threads.
        cpp_extension.load(name="duo_cpu_kernel", sources=[str(source)], build_directory=str(build_dir),
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # compiler missing, headers missing, ninja missing, ...
        raise CpuKernelUnavailable(f"building {SOURCE.name} in {build_dir} failed: {e}") from e


ISAS = ("avx512", "avx2", "portable")  # best first


def supported_isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs the kernel with (torch's CPU capability check; AVX512 there means
    AVX-512 F/BW/VL/DQ, and the C++ side checks again)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return ISAS[{"AVX512": 0, "AVX2": 1}.get(capability, 2):]


def isa() -> str:
    """What the kernel runs with: the best this CPU has, or ``DUO_CPU_ISA`` (avx512, avx2, portable) if set."""
    asked = os.environ.get("DUO_CPU_ISA")
    if not asked:
        return supported_isas()[0]
    if asked not in supported_isas():
        raise CpuKernelUnavailable(f"DUO_CPU_ISA={asked}: this CPU runs the kernel with {', '.join(supported_isas())}")
    return asked


def cpu_name() -> str:
    """The CPU's model name (the key of the crossover table)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _table(path: Path = TABLE_PATH) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def max_sparse_m(n: int, k: int, weight_density: float, isa_name: str, threads: int | None = None,
                 table: dict | None = None) -> tuple[int, str]:
    """(largest M the sparse kernel serves for an [N, K] weight with this fraction of nonzeros, where that
    number comes from).

    The table holds, per CPU name, instruction set and thread count, crossovers measured at some weight
    densities; the nearest one serves. Each has the crossover per "NxK" shape and a "default" for shapes it did
    not measure. Denser weights leave the kernel less to skip, so its crossover is lower. The instruction set is
    part of the key: CPUs of one model name differ in it (2-core "AMD EPYC" VMs with and without AVX-512), and
    the AVX2 path's crossover is half the AVX-512 path's.
    """
    table = _table() if table is None else table
    threads = torch.get_num_threads() if threads is None else threads
    entry = table.get("cpus", {}).get(cpu_name(), {}).get(isa_name, {}).get(str(threads))
    if entry is None:
        return UNMEASURED_MAX_SPARSE_M, f"no crossover measured for {cpu_name()!r}, isa {isa_name}, {threads} threads"
    density = min(entry["weight_density"], key=lambda d: abs(float(d) - weight_density))
    at = entry["weight_density"][density]
    where = f"on {cpu_name()!r}, isa {isa_name}, {threads} threads, weight density {density}"
    if f"{n}x{k}" in at["shapes"]:
        return int(at["shapes"][f"{n}x{k}"]), f"measured for {n}x{k} {where}"
    return int(at["default"]), f"measured default {where}"


@dataclass
class CpuPacked:
    """A weight [N, K] in the kernel's format (see cpu_kernel.cpp): the segments in ``blob`` (float32, mask
    words bit for bit), their starts ``offsets`` [T, K] (int32), and the instruction set the kernel runs it
    with (chosen at load time, so nothing is decided while torch.compile traces a call)."""

    blob: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int
    isa: str
    weight_density: float  # fraction of nonzero weights

    @property
    def words(self) -> int:
        return self.tile_width // WORD

    @property
    def tile_width(self) -> int:
        return tile_width(self.out_features)

    def nbytes(self) -> int:
        return self.blob.numel() * 4 + self.offsets.numel() * 4


def tile_width(n: int) -> int:
    """Outputs per tile: the fewest equal tiles of at most MAX_TILE outputs (threads split the input
    channels of a tile where there are fewer tiles than threads)."""
    tiles = -(-n // MAX_TILE)
    return WORD * -(-n // (tiles * WORD))


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _huge_page_zeros(numel: int) -> torch.Tensor:
    """Zeros, backed by transparent huge pages where the kernel offers them (madvise mode): the kernel's
    reads jump over dead channels, and with 4 KiB pages every jump is a TLB miss the prefetcher stops at."""
    out = torch.empty(numel, dtype=torch.float32)
    start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (out.data_ptr() + numel * 4) // HUGE_PAGE * HUGE_PAGE
    if end > start and platform.system() == "Linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return out.zero_()  # first touch after madvise: faulted in as huge pages


def pack(weight: torch.Tensor) -> CpuPacked:
    """The kernel's format of a dense-with-zeros fp32 weight [N, K]."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        raise ValueError(f"the CPU kernel packs float32 [N, K] weights, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    width = tile_width(n)
    tiles, words = -(-n // width), width // WORD
    rows = torch.zeros(tiles * width, k, dtype=weight.dtype)
    rows[:n] = weight.detach().cpu()
    segments = rows.view(tiles, width, k).transpose(1, 2)  # [T, K, width]: tile, input channel, output in tile
    nonzero = segments != 0
    bits = nonzero.reshape(tiles, k, words, WORD).to(torch.int64) << torch.arange(WORD, dtype=torch.int64)
    mask_words = bits.sum(-1).flatten()
    mask_words = (mask_words - (mask_words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # same bits, signed
    counts = nonzero.sum(-1).flatten()  # nonzeros per segment
    lengths = counts + words
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum()) + PAD
    if total >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} is too large for int32 offsets")
    blob = _huge_page_zeros(total)
    as_int = blob.view(torch.int32)  # integer copies: mask words keep their bits whatever float they spell
    as_int[(starts[:, None] + torch.arange(words)).flatten()] = mask_words
    segment_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    rank = torch.arange(segment_of.numel()) - (torch.cumsum(counts, 0) - counts)[segment_of]
    as_int[starts[segment_of] + words + rank] = segments[nonzero].contiguous().view(torch.int32)
    return CpuPacked(blob, starts.to(torch.int32).view(tiles, k).contiguous(), n, k, isa(),
                     int(counts.sum()) / (n * k))


def sparse_linear(x: torch.Tensor, threshold: torch.Tensor, packed: CpuPacked, bias: torch.Tensor | None = None,
                  dense_handle: torch.Tensor | None = None, max_m: int = 2**31 - 1) -> torch.Tensor:
    """``(x * (|x| > t)) @ W^T + bias`` for fp32 x [..., K] -> [..., N].

    Up to ``max_m`` tokens (or always, without ``dense_handle``) the sparse kernel; above, vLLM's oneDNN
    GEMM through ``dense_handle`` (the handler tensor of ``vllm._custom_ops.create_onednn_mm``).
    """
    # The overload, not the packet: the packet's overload resolution cost 3 us a call, 0.4 ms a token over
    # SmolLM2's 120 linears. vLLM's hidden states are 2-D already: no reshapes there.
    op = torch.ops.duo.cpu_sparse_linear.default
    if x.dim() == 2:
        return op(x, threshold, packed.blob, packed.offsets, bias, dense_handle, packed.out_features, max_m, packed.isa)
    y = op(x.reshape(-1, packed.in_features), threshold, packed.blob, packed.offsets, bias, dense_handle,
           packed.out_features, max_m, packed.isa)
    return y.reshape(*x.shape[:-1], packed.out_features)


def _register_fake() -> None:
    @torch.library.register_fake("duo::cpu_sparse_linear")
    def _fake(x, threshold, blob, offsets, bias, dense_handle, out_features, max_sparse_m, isa):
        return x.new_empty(x.shape[0], out_features)


@functools.cache
def ensure_loaded() -> None:
    """load() plus the op's fake implementation (torch.compile); idempotent."""
    load()
    _register_fake()


def main() -> None:
    """`python -m duo_vllm.kernels.cpu_kernel`: build the kernel now (make setup) and say where it is."""
    ensure_loaded()
    print(f"duo CPU kernel: built in {_cache_dir()}, isa {isa()}, CPU {cpu_name()!r}")


if __name__ == "__main__":
    main()
