#!/usr/bin/env python
"""Static H100 budget of the dual-sparse kernels, computed on a CPU: a MODEL, never a measurement.

For every decode-kernel variant (M = 1, 2, 4, 8, 16; bf16, fp16; LLaMA-2-7B and LLaMA-3-8B linear
shapes) the launch the dispatcher would make is compiled ahead of time for sm_90 and its SASS is read:
  registers, spills (local memory), shared memory, programs per SM (occupancy), K splits;
  hot-loop warp instructions per dense weight element = hot-loop body x warps x iterations / (N x K),
    the iterations being ceil(live channels of the split / CHUNK) for the sampled activations;
  all warp instructions of the launch = every program's straight-line code once (the code after the
    first EXIT past the hot loop, the last split's epilogue, once per tile) + compaction loop x its
    steps + hot loop x its iterations + the final split reduction loops' bodies once per split each
    (an upper bound: they are unrolled);
  bytes = 32-byte sectors of the bitmap format the live channels touch (masks, offsets, values) + x +
    the output. The fp32 split-K partials and the live-channel scratch are L2 traffic, not counted
    (reported as l2_bytes);
  implied H100 time = max(bytes / 3.0 TB/s, warp instructions / 9.3e11 per s) against the dense bf16
    bound (N x K + x + output bytes) / 3.0 TB/s.
Latency, occupancy limits beyond registers, cache behaviour, tail effects and launch overhead are not
in it. It can show that a design cannot be fast; only a GPU run shows that one is.

Masks and activations: no SmolLM2 duo checkpoint exists on this machine, so the masks are random at
p_w (nonzeros per segment ~ Binomial(block_n, 1 - p_w)) and x is random normal with a quantile
threshold dropping p_x of its entries, independent per token (real activations are correlated across
tokens, so real unions at M > 1 are smaller).

"bitmap_v0" rows are the previous decode kernel (the tl.dot/FMA bitmap kernel, still the M > 16
path), compiled the same way, for the before/after comparison.

  python benchmarks/kernel_static.py [--out benchmarks/results/kernel_static.json] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling, not interpreting
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import MODELS  # noqa: E402

BANDWIDTH = 3.0e12  # H100 SXM, device-to-device copy, B/s
ISSUE_RATE = 9.3e11  # 132 SMs x 4 schedulers x 1.755 GHz, warp instructions/s
SMS = 132
SECTOR = 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = ((0.5, 0.5), (0.5, 0.0), (0.6, 0.6))
TARGETS = dict(instr_per_element=0.25, implied_ratio=0.35, resident_ratio=0.6)
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


# ---- SASS ------------------------------------------------------------------------------------------

def parse_sass(text: str) -> list[tuple[int, str]]:
    """[(address, instruction)] of a cuobjdump -sass listing (one kernel)."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_INSTR.search, text.splitlines()) if m]


def opcode(ins: str) -> str:
    """'FFMA' for '@P0 FFMA.FTZ R1, ...'."""
    if ins.startswith("@"):
        ins = ins.split(None, 1)[1]
    return ins.split()[0].split(".")[0]


def find_loops(instrs: list[tuple[int, str]]) -> list[dict]:
    """Loops bounded by a backward branch: body = every instruction from the target to the branch."""
    loops = []
    for addr, ins in instrs:
        if opcode(ins) != "BRA":
            continue
        m = re.search(r"(0x[0-9a-f]+)\s*$", ins)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [i for a, i in instrs if start <= a <= addr]
            loops.append(dict(start=start, end=addr, count=len(body), ops=collections.Counter(map(opcode, body))))
    return loops


def sass_budget(sass: str) -> dict:
    """Instruction counts of one decode-style kernel: the hot loop (most FMAs), the loops before it
    (compaction), after it (split reduction) and the straight-line rest."""
    instrs = parse_sass(sass)
    loops = find_loops(instrs)
    if not loops:
        raise ValueError("no loop in the SASS")
    hot = max(loops, key=lambda lp: (lp["ops"]["FFMA"] + lp["ops"]["HFMA2"], lp["count"]))
    before = [lp for lp in loops if lp["end"] < hot["start"]]
    after = [lp for lp in loops if lp["start"] > hot["end"]]
    inside = {a for lp in loops for a, _ in instrs if lp["start"] <= a <= lp["end"]}
    # after the hot loop, the code past the first EXIT runs only in the last split of a tile (the ticket
    # winner): the final reduction's straight-line part
    exits = [a for a, i in instrs if a > hot["end"] and opcode(i) == "EXIT"]
    cut = exits[0] if len(exits) > 1 else max(a for a, _ in instrs)
    straight = [(a, i) for a, i in instrs if a not in inside]
    last_block = sum(1 for a, i in straight if a > cut and not (opcode(i) == "BRA" and i.endswith(hex(a))))
    return dict(total=len(instrs), outside=sum(1 for a, _ in straight if a <= cut), last_block=last_block,
                hot=hot["count"], hot_ops=dict(hot["ops"].most_common()), before=[lp["count"] for lp in before],
                after=[lp["count"] for lp in after])


# ---- sampled masks and activations ----------------------------------------------------------------

def sample(n: int, k: int, m: int, p_w: float, p_x: float, block_n: int, seed: int):
    """(nonzeros per segment [T, K] int64, live channels of the batch [K] bool)."""
    gen = torch.Generator().manual_seed(seed)
    tiles = -(-n // block_n)
    width = torch.full((tiles, 1), float(block_n))
    width[-1] = n - (tiles - 1) * block_n
    counts = torch.binomial(width.expand(tiles, k).contiguous(), torch.full((tiles, k), 1 - p_w), generator=gen)
    x = torch.randn(m, k, generator=gen)
    t = torch.quantile(x.abs().flatten(), p_x) if p_x > 0 else torch.tensor(-1.0)
    return counts.long(), (x.abs() > t).any(0)


def sector_bytes(counts: torch.Tensor, live: torch.Tensor, block_n: int, elem: int) -> tuple[int, int]:
    """(useful bytes, 32-byte-sector bytes) of the format read for the live channels of every tile.

    Segments are in (tile, channel) order, so the live ones are sorted by address and two neighbours
    overlap by at most the one sector where one ends and the next starts."""
    tiles, k = counts.shape
    seg = (torch.arange(tiles)[:, None] * k + torch.arange(k)[None, :])[:, live].flatten()
    cnt = counts[:, live].flatten()
    mask_b = block_n // 8
    starts = (torch.cumsum(counts.flatten(), 0) - counts.flatten())[seg]
    useful = int(cnt.sum()) * elem + seg.numel() * (mask_b + 4)
    sectors = torch.unique(seg * mask_b // SECTOR).numel() + torch.unique(seg * 4 // SECTOR).numel()
    # every lane of a live segment gathers, a clear bit reading the value after the segment's last one:
    # the read covers [start, start + cnt] (one element past the end, even for an empty segment)
    first = starts * elem // SECTOR
    last = ((starts + cnt + 1) * elem - 1) // SECTOR
    shared = int((first[1:] <= last[:-1]).sum()) if first.numel() > 1 else 0  # neighbours share a sector
    sectors += int((last - first + 1).sum()) - shared
    return useful, sectors * SECTOR


# ---- one variant ----------------------------------------------------------------------------------

class Compiler:
    """aot_compile with a cache keyed by what the compiled code depends on."""

    def __init__(self, tk):
        self.tk, self.cache = tk, {}

    def __call__(self, launch):
        kernel, _, args, cst, warps = launch
        spec = tuple((type(a).__name__, a == 1, a % 16 == 0) if isinstance(a, int) else str(a.dtype) for a in args)
        key = (kernel.fn.__name__, spec, tuple(sorted(cst.items())), warps)
        if key not in self.cache:
            r = self.tk.aot_compile(launch)
            self.cache[key] = dict(r, budget=sass_budget(r["sass"]))
        return self.cache[key]


def decode_record(tk, comp: Compiler, model: str, linear: str, n: int, k: int, m: int, dtype: str,
                  p_w: float, p_x: float, block_n: int = 128) -> dict:
    dt = DTYPES[dtype]
    packed = tk._meta_packed(n, k, dt, block_n, p_w)
    x, t = torch.empty(m, k, dtype=dt, device="meta"), torch.empty(1, device="meta")
    first = comp(tk.decode_call(x, t, packed, None, slots=SMS * 4)[1])  # registers do not depend on the split
    occupancy = tk.programs_per_sm(first["registers"], tk.decode_warps(m), first["shared"])
    _, launch = tk.decode_call(x, t, packed, None, slots=SMS * occupancy)
    r = comp(launch)
    kernel, (tiles, splits), args, cst, warps = launch
    k_per_split = args[-2]
    counts, live = sample(n, k, m, p_w, p_x, block_n, seed=n * 7 + k + m)
    b = r["budget"]
    hot_iters = 0
    scans = 0
    for s in range(splits):
        lo, hi = s * k_per_split, min(k, (s + 1) * k_per_split)
        hot_iters += -(-int(live[lo:hi].sum()) // cst["CHUNK"])
        scans += -(-(hi - lo) // cst["SCAN"])
    compact = sum(b["before"])  # per SCAN step
    reduce_per_split = sum(b["after"])  # conservative: every reduction loop body once per split
    per_tile = (splits * b["outside"] + b["last_block"] + scans * compact + hot_iters * b["hot"]
                + splits * reduce_per_split)
    warp_instr = tiles * per_tile * warps
    hot_instr = tiles * hot_iters * b["hot"] * warps
    elem = dt.itemsize
    useful, fmt_bytes = sector_bytes(counts, live, block_n, elem)
    io = (m * k + m * n) * elem
    hbm = fmt_bytes + io
    dense = (n * k + m * k + m * n) * 2
    nnz = int(counts.sum())
    resident = nnz * elem + tiles * k * (block_n // 8 + 4) + tiles * 4
    implied = max(hbm / BANDWIDTH, warp_instr / ISSUE_RATE)
    return dict(kernel="decode", model=model, linear=linear, shape=f"{n}x{k}", n=n, k=k, M=m, dtype=dtype,
                p_w=p_w, p_x=p_x, live_fraction=float(live.float().mean()), registers=r["registers"],
                spills=r["local"], stack=r["stack"], shared=r["shared"], num_warps=warps, programs_per_sm=occupancy,
                grid=f"{tiles}x{splits}", k_per_split=k_per_split, chunk=cst["CHUNK"], hot_loop_instr=b["hot"],
                hot_loop_ops=b["hot_ops"], compaction_instr=compact, outside_instr=b["outside"],
                last_block_instr=b["last_block"],
                instr_per_visited_element=b["hot"] * warps / (cst["CHUNK"] * block_n),
                warp_instr_per_element=hot_instr / (n * k), all_warp_instr_per_element=warp_instr / (n * k),
                bytes_per_element=hbm / (n * k), useful_bytes_per_element=(useful + io) / (n * k),
                l2_bytes=2 * splits * m * n * 4 + tiles * splits * (k_per_split + cst["CHUNK"]) * (1 + cst["BLOCK_M"]) * 4,
                resident_ratio=resident / (n * k * 2), bytes_us=hbm / BANDWIDTH * 1e6,
                issue_us=warp_instr / ISSUE_RATE * 1e6, implied_us=implied * 1e6, dense_us=dense / BANDWIDTH * 1e6,
                ratio=implied * BANDWIDTH / dense, bound="bytes" if hbm / BANDWIDTH >= warp_instr / ISSUE_RATE else "issue")


def v0_record(tk, comp: Compiler, model: str, linear: str, n: int, k: int, m: int, dtype: str,
              p_w: float, p_x: float, block_n: int = 128) -> dict:
    """The previous decode kernel: its loop walks every channel (BLOCK_K at a time), live or not."""
    dt = DTYPES[dtype]
    packed = tk._meta_packed(n, k, dt, block_n, p_w)
    x, t = torch.empty(m, k, dtype=dt, device="meta"), torch.empty(1, device="meta")
    calls = tk._calls(tk._bitmap_kernel, (packed.values, packed.masks, packed.offsets), x, t, n, block_n,
                      None, None, None, 2, SKIP_CHANNELS=True)[1]
    r = comp(calls[0])
    kernel, grid, args, cst, warps = calls[0]
    b = r["budget"]
    counts, live = sample(n, k, m, p_w, p_x, block_n, seed=n * 7 + k + m)
    tiles = -(-n // block_n)
    hot_instr = tiles * (-(-k // cst["BLOCK_K"])) * b["hot"] * warps
    warp_instr = hot_instr + grid[0] * grid[1] * b["outside"] * warps
    elem = dt.itemsize
    _, fmt_bytes = sector_bytes(counts, live, block_n, elem)
    hbm = fmt_bytes + (m * k + m * n) * elem
    dense = (n * k + m * k + m * n) * 2
    implied = max(hbm / BANDWIDTH, warp_instr / ISSUE_RATE)
    return dict(kernel="bitmap_v0", model=model, linear=linear, shape=f"{n}x{k}", n=n, k=k, M=m, dtype=dtype,
                p_w=p_w, p_x=p_x, registers=r["registers"], spills=r["local"], shared=r["shared"], num_warps=warps,
                hot_loop_instr=b["hot"], hot_loop_ops=b["hot_ops"],
                instr_per_visited_element=b["hot"] * warps / (cst["BLOCK_K"] * block_n),
                warp_instr_per_element=hot_instr / (n * k), bytes_per_element=hbm / (n * k),
                resident_ratio=None, implied_us=implied * 1e6, dense_us=dense / BANDWIDTH * 1e6,
                ratio=implied * BANDWIDTH / dense,
                bound="bytes" if hbm / BANDWIDTH >= warp_instr / ISSUE_RATE else "issue")


# ---- report ---------------------------------------------------------------------------------------

def summary(records: list[dict]) -> dict:
    """Per model, kernel, dtype and M at W50+X50: the sum of the four linears; and the targets."""
    sums = {}
    for r in records:
        if (r["p_w"], r["p_x"]) != (0.5, 0.5):
            continue
        key = f"{r['kernel']} {r['model']} {r['dtype']} M={r['M']}"
        s = sums.setdefault(key, dict(implied_us=0.0, dense_us=0.0, hot=0.0, elements=0))
        s["implied_us"] += r["implied_us"]
        s["dense_us"] += r["dense_us"]
        s["hot"] += r["warp_instr_per_element"] * r["n"] * r["k"]
        s["elements"] += r["n"] * r["k"]
    out = {k: dict(implied_us=v["implied_us"], dense_us=v["dense_us"], ratio=v["implied_us"] / v["dense_us"],
                   warp_instr_per_element=v["hot"] / v["elements"]) for k, v in sums.items()}
    dec = [r for r in records if r["kernel"] == "decode"]
    m1 = [r for r in dec if r["M"] == 1 and (r["p_w"], r["p_x"]) == (0.5, 0.5)]
    l2 = [out[k] for k in out if k.startswith("decode llama2-7b") and k.endswith("M=1")]
    targets = dict(
        instr_per_element=dict(target=f"<= {TARGETS['instr_per_element']}",
                               worst=max(r["warp_instr_per_element"] for r in m1)),
        implied_ratio_llama2_7b=dict(target=f"<= {TARGETS['implied_ratio']}", worst=max(s["ratio"] for s in l2)),
        spills=dict(target="0 at every M", worst=max(r["spills"] for r in dec)),
        resident_ratio=dict(target=f"<= {TARGETS['resident_ratio']} at W50",
                            worst=max(r["resident_ratio"] for r in dec if r["p_w"] == 0.5)),
    )
    limits = dict(instr_per_element=TARGETS["instr_per_element"], implied_ratio_llama2_7b=TARGETS["implied_ratio"],
                  spills=0, resident_ratio=TARGETS["resident_ratio"])
    for name, t in targets.items():
        t["met"] = t["worst"] <= limits[name]
    return dict(sums=out, targets=targets)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()} ({cpu}, {os.cpu_count()} cores), no GPU"


def markdown(result: dict) -> str:
    lines = [
        "# Static sm_90 budget of the dual-sparse kernels (a MODEL, not a measurement)",
        "",
        f"`{result['command']}` — {result['date']}, {result['machine']}, triton {result['triton']}.",
        "",
        "Compiled ahead of time for sm_90, hot loop counted in the SASS; implied H100 time = max(bytes / 3.0 TB/s,",
        "warp instructions / 9.3e11 per s), dense = bf16 weight + x + output bytes / 3.0 TB/s. Random masks at",
        "p_w, random normal x with a quantile threshold at p_x (no SmolLM2 duo checkpoint on this machine).",
        "Latency, cache behaviour and launch overhead are not in the model; only a GPU run measures.",
        "",
        "## Targets (W50+X50, M = 1)",
        "",
        "| target | required | model | met |",
        "|---|---|---|---|",
    ]
    for name, t in result["summary"]["targets"].items():
        lines.append(f"| {name} | {t['target']} | {t['worst']:.3f} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "## Sum of the four linears of a layer at W50+X50", "",
              "| kernel | model | dtype | M | implied µs | dense µs | ratio | hot-loop warp instr / dense element |",
              "|---|---|---|---|---|---|---|---|"]
    for key, s in result["summary"]["sums"].items():
        kernel, model, dtype, m = key.split()
        lines.append(f"| {kernel} | {model} | {dtype} | {m[2:]} | {s['implied_us']:.1f} | {s['dense_us']:.1f} | "
                     f"{s['ratio']:.3f} | {s['warp_instr_per_element']:.3f} |")
    lines += ["", "## Every variant", "",
              "| kernel | model | linear | N×K | M | dtype | p_w | p_x | regs | spills | progs/SM | grid | hot instr "
              "| instr/visited elem | instr/dense elem | bytes/elem | implied µs | dense µs | ratio | bound |",
              "|" + "---|" * 20]
    for r in result["records"]:
        lines.append(
            f"| {r['kernel']} | {r['model']} | {r['linear']} | {r['shape']} | {r['M']} | {r['dtype']} | {r['p_w']} | "
            f"{r['p_x']} | {r['registers']} | {r['spills']} | {r.get('programs_per_sm', '–')} | "
            f"{r.get('grid', '–')} | {r['hot_loop_instr']} | "
            f"{r['instr_per_visited_element']:.3f} | {r['warp_instr_per_element']:.3f} | {r['bytes_per_element']:.3f} | "
            f"{r['implied_us']:.2f} | {r['dense_us']:.2f} | {r['ratio']:.3f} | {r['bound']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernel_static.json",
                    help="JSON (the markdown table is written beside it, .md)")
    ap.add_argument("--quick", action="store_true", help="LLaMA-2-7B, bf16, W50+X50 only")
    args = ap.parse_args(argv)
    import triton

    from duo_vllm.kernels import triton_kernels as tk

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "cuobjdump").is_file():
        print(f"kernel_static: no cuobjdump in {bin_dir}: this triton has no NVIDIA backend", file=sys.stderr)
        return 2
    comp = Compiler(tk)
    models = {"llama2-7b": MODELS["llama2-7b"]} if args.quick else MODELS
    dtypes = ["bf16"] if args.quick else list(DTYPES)
    sparsities = SPARSITIES[:1] if args.quick else SPARSITIES
    records = []
    for model, shapes in models.items():
        for linear, n, k in shapes:
            for dtype in dtypes:
                for m in BATCHES:
                    for p_w, p_x in sparsities:
                        records.append(decode_record(tk, comp, model, linear, n, k, m, dtype, p_w, p_x))
                        r = records[-1]
                        print(f"{model:9} {linear:7} {r['shape']:>10} M={m:2} {dtype} W{p_w:.1f}+X{p_x:.1f} "
                              f"regs={r['registers']:3} spills={r['spills']} hot={r['hot_loop_instr']:4} "
                              f"instr/elem={r['warp_instr_per_element']:.3f} bytes/elem={r['bytes_per_element']:.3f} "
                              f"implied={r['implied_us']:7.2f}us dense={r['dense_us']:7.2f}us "
                              f"ratio={r['ratio']:.3f} ({r['bound']})", flush=True)
            records.append(v0_record(tk, comp, model, linear, n, k, 1, "bf16", 0.5, 0.5))
    result = dict(note="MODEL, not a measurement: static sm_90 SASS counts and a byte model (see the script)",
                  command="python benchmarks/kernel_static.py" + (" --quick" if args.quick else ""),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  machine=machine(), triton=triton.__version__, bandwidth=BANDWIDTH, issue_rate=ISSUE_RATE,
                  records=records)
    # the hot loops' instruction mix, once per compiled variant (the records stay flat)
    result["hot_loop_ops"] = {f"{r['kernel']} M={r['M']} {r['dtype']}": r.pop("hot_loop_ops") for r in records}
    result["summary"] = summary(records)
    from duo_vllm.files import write_json_atomic, write_text_atomic

    out = Path(args.out)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), markdown(result))
    for name, t in result["summary"]["targets"].items():
        print(f"target {name}: {t['target']}, model {t['worst']:.3f}: {'met' if t['met'] else 'NOT met'}")
    for key, s in result["summary"]["sums"].items():
        if key.endswith("M=1"):
            print(f"{key}: implied {s['implied_us']:.1f} us vs dense {s['dense_us']:.1f} us = {s['ratio']:.3f}x "
                  "(model)")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
