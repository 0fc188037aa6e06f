#!/usr/bin/env python
"""Kernel benchmark: the dual-sparse bitmap kernel beside cuBLAS dense and a TEAL-style activation-only kernel.

GPU (default): LLaMA-2-7B / LLaMA-3-8B linear shapes x batch x (p_w, p_x); per method the median time
(triton.testing.do_bench, weight buffers rotated past L2), the bytes the method must read (weights in
its format for the batch's live channels + x + output; the split-K workspace, which stays in L2, is not
counted), effective TB/s, speedup over dense and the ideal speedup of the bandwidth model (dense
bytes / method bytes).
  python benchmarks/kernel_bench.py --out benchmarks/results/kernel_bench.json \
      [--write-table duo_vllm/kernels/crossover.json]
Methods: dense = F.linear(x, W) (cuBLAS, the baseline), dense_thr = the dispatch's "gemm" path
(threshold then cuBLAS), teal = activation-only Triton kernel on W^T [K, N], wsparse = bitmap kernel
reading every segment, dual = bitmap kernel skipping channels dead for the batch.
Activations here are random normal with a quantile threshold, independent per token, so the union of
live channels over a batch (1 - p_x^M) shrinks faster than with real, correlated activations.

--cpu-check: tiny shapes through the Triton interpreter, no timing (proves the script and kernels run).
--ckpt DIR: bytes per layer of a duo checkpoint with its real masks and thresholds (CPU is fine):
weight bytes of the format vs dense, and with --activations FILE the bytes actually touched per token.
FILE is a torch.save'd dict {"model.layers.{i}.{linear}": Tensor[T, K]} holding the inputs of decoder
linears on real text (any linear of a group q/k/v or gate/up stands for the group), e.g. captured with
forward pre-hooks on duo_vllm.reference.load_reference_model; producing it is out of scope here.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from duo_vllm.files import write_json_atomic
from duo_vllm.format import LINEAR_GROUPS, apply_threshold, load_thresholds
from duo_vllm.kernels import channel_bytes, dense_bytes, format_bytes, pack_weight

MODELS = {
    "llama2-7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)],
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
}
TINY = {"tiny": [("a", 192, 96), ("b", 96, 160)]}
SPARSITIES = [(0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5), (0.6, 0.6)]
BATCHES = [1, 2, 4, 8, 16]
METHODS = ("dense", "dense_thr", "teal", "wsparse", "dual")
TABLE_PATHS = {"dual": "dual", "wsparse": "wsparse", "dense_thr": "gemm"}  # method -> dispatch path
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_REL_ERR = 1e-2


def _pair(s: str) -> tuple[float, float]:
    p_w, p_x = s.split(":")
    return float(p_w), float(p_x)


def _bench(fns: list, rep_ms: int) -> float:
    """Median ms over calls that cycle through ``fns`` (one per rotated weight copy)."""
    import triton.testing

    it = itertools.cycle(fns)
    return triton.testing.do_bench(lambda: next(it)(), warmup=25, rep=rep_ms, return_mode="median")


def run_case(tk, model: str, linear: str, n: int, k: int, m: int, p_w: float, p_x: float,
             dtype: torch.dtype, device: str, rep_ms: int | None, seed: int) -> list[dict]:
    """Every method on one (shape, batch, sparsity); times are None when rep_ms is None (no GPU)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < p_w] = 0.0
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    t = torch.quantile(x.float().abs().flatten().cpu(), p_x) if p_x > 0 else torch.tensor(0.0)
    t = t.float().to(device)
    w = w.to(dtype).to(device)

    # enough copies of every weight representation that consecutive calls miss L2
    elem = w.element_size()
    copies = 1
    if device == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        copies = max(1, min(8, math.ceil(3 * l2 / (n * k * elem))))
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    packs = [pack_weight(wi) for wi in ws]
    wts = [wi.t().contiguous() for wi in ws]

    live = x.abs() > t.to(dtype)
    union = live.any(0)
    io = (m * k + m * n) * elem
    read = {
        "dense": n * k * elem + io,
        "dense_thr": n * k * elem + io,
        "teal": int(union.sum()) * n * elem + io,
        "wsparse": format_bytes(packs[0]) + io,
        "dual": format_bytes(packs[0], union) + io,
    }
    fns = {
        "dense": [lambda wi=wi: F.linear(x, wi) for wi in ws],
        "dense_thr": [lambda wi=wi: F.linear(apply_threshold(x, t.reshape(())), wi) for wi in ws],
        "teal": [lambda wt=wt: tk.act_sparse_matmul(x, t, wt) for wt in wts],
        "wsparse": [lambda p=p: tk.bitmap_matmul(x, t, p, skip_channels=False) for p in packs],
        "dual": [lambda p=p: tk.bitmap_matmul(x, t, p) for p in packs],
    }
    ref = F.linear(apply_threshold(x, t.reshape(())).double(), w.double())
    ref_dense = F.linear(x.double(), w.double())

    rows = []
    for method in METHODS:
        out = fns[method][0]().double()
        want = ref_dense if method == "dense" else ref
        err = ((out - want).norm() / want.norm()).item()
        ms = _bench(fns[method], rep_ms) if rep_ms is not None else None
        rows.append(dict(model=model, linear=linear, n=n, k=k, m=m, p_w=p_w, p_x=p_x, method=method,
                         time_us=None if ms is None else ms * 1e3, bytes=read[method],
                         live_fraction=float(union.float().mean()), rel_err=err, copies=copies))
    dense_row = rows[0]
    for r in rows:
        r["ideal_speedup"] = dense_row["bytes"] / r["bytes"]
        if r["time_us"] is not None:
            r["tb_per_s"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e12
            r["speedup"] = dense_row["time_us"] / r["time_us"]
    return rows


def _fmt(v, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


HEADER = (f"{'model':10} {'linear':8} {'N':>6} {'K':>6} {'M':>3} {'p_w':>4} {'p_x':>4} {'method':9} "
          f"{'us':>8} {'MB':>8} {'TB/s':>6} {'speedup':>7} {'ideal':>6} {'rel_err':>8}")


def format_row(r: dict) -> str:
    return (f"{r['model']:10} {r['linear']:8} {r['n']:6} {r['k']:6} {r['m']:3} {r['p_w']:4.2f} {r['p_x']:4.2f} "
            f"{r['method']:9} {_fmt(r['time_us'], '8.1f')} {r['bytes'] / 1e6:8.2f} {_fmt(r.get('tb_per_s'), '6.2f')} "
            f"{_fmt(r.get('speedup'), '7.2f')} {r['ideal_speedup']:6.2f} {r['rel_err']:8.1e}")


def crossover_table(rows: list[dict], p_w: float, p_x: float, device: str) -> dict:
    """For each shape and batch at (p_w, p_x), the fastest dispatch path (duo_vllm.kernels.dispatch format)."""
    shapes: dict[str, dict[str, str]] = {}
    for r in rows:
        if (r["p_w"], r["p_x"]) != (p_w, p_x) or r["method"] not in TABLE_PATHS:
            continue
        entry = shapes.setdefault(f"{r['n']}x{r['k']}", {})
        best = entry.get(str(r["m"]))
        if best is None or r["time_us"] < best[1]:
            entry[str(r["m"])] = (TABLE_PATHS[r["method"]], r["time_us"])
    return {"device": device, "p_w": p_w, "p_x": p_x,
            "shapes": {s: {m: v[0] for m, v in e.items()} for s, e in shapes.items()}}


def checkpoint_report(ckpt_dir: str, activations: str | None, batches: list[int], block_n: int = 128) -> list[dict]:
    """Per layer and fused group: format bytes vs dense with the checkpoint's real masks; with activations,
    the bytes touched per decode step (mean over groups of ``b`` consecutive tokens) with its thresholds."""
    from safetensors import safe_open

    thresholds = load_thresholds(ckpt_dir)
    where = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            where.update({name: f for name in sf.keys()})
    acts = torch.load(activations, map_location="cpu") if activations else {}

    def tensor(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as sf:
            return sf.get_tensor(name)

    rows = []
    for layer in sorted({layer for layer, _ in thresholds}):
        for group, names in LINEAR_GROUPS.items():
            w = torch.cat([tensor(f"model.layers.{layer}.{name}.weight") for name in names])
            packed = pack_weight(w, block_n=block_n, keep_gemm_weight=False)
            row = dict(layer=layer, group=group, n=w.shape[0], k=w.shape[1],
                       weight_sparsity=1 - packed.values.numel() / w.numel(),
                       dense_bytes=dense_bytes(packed), format_bytes=format_bytes(packed))
            row["format_ratio"] = row["format_bytes"] / row["dense_bytes"]
            keys = [f"model.layers.{layer}.{name}" for name in names if f"model.layers.{layer}.{name}" in acts]
            x = acts[keys[0]] if keys else None
            if x is not None:
                t = torch.tensor(thresholds[(layer, names[0])])
                live = apply_threshold(x, t) != 0
                per_channel = channel_bytes(packed).double()
                row["tokens"] = live.shape[0]
                row["act_sparsity"] = 1 - live.float().mean().item()
                # what the ratio would be if live channels were as dense as average ones
                row["independent_ratio"] = (1 - row["act_sparsity"]) * row["format_ratio"]
                for b in batches:
                    steps = live[: live.shape[0] // b * b].view(-1, b, live.shape[1]).any(1)
                    row[f"touched_ratio_b{b}"] = (steps.double() @ per_channel).mean().item() / row["dense_bytes"]
            rows.append(row)
    return rows


def print_checkpoint(rows: list[dict], batches: list[int]) -> None:
    has_acts = "act_sparsity" in rows[0]
    cols = f"{'layer':>5} {'group':8} {'N':>6} {'K':>6} {'s_w':>5} {'format/dense':>12}"
    if has_acts:
        cols += f" {'s_a':>5} {'indep':>6}" + "".join(f" {'touched b' + str(b):>11}" for b in batches)
    print(cols)
    for r in rows:
        line = (f"{r['layer']:5} {r['group']:8} {r['n']:6} {r['k']:6} {r['weight_sparsity']:5.3f} "
                f"{r['format_ratio']:12.3f}")
        if has_acts:
            line += f" {r['act_sparsity']:5.3f} {r['independent_ratio']:6.3f}"
            line += "".join(f" {r[f'touched_ratio_b{b}']:11.3f}" for b in batches)
        print(line)
    dense = sum(r["dense_bytes"] for r in rows)
    print(f"total: dense {dense / 1e6:.1f} MB, format {sum(r['format_bytes'] for r in rows) / 1e6:.1f} MB "
          f"({sum(r['format_bytes'] for r in rows) / dense:.3f} of dense)")
    if has_acts:
        for b in batches:
            touched = sum(r[f"touched_ratio_b{b}"] * r["dense_bytes"] for r in rows)
            print(f"touched per decode step, batch {b}: {touched / 1e6:.1f} MB ({touched / dense:.3f} of dense)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON results (GPU default: benchmarks/results/kernel_bench.json)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--sparsities", default=",".join(f"{a}:{b}" for a, b in SPARSITIES), help="p_w:p_x,...")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per method")
    ap.add_argument("--write-table", help="write the dispatch crossover table (JSON) measured at --table-sparsity")
    ap.add_argument("--table-sparsity", default="0.5:0.5", help="p_w:p_x the crossover table is chosen at")
    ap.add_argument("--cpu-check", "--dry-run", action="store_true", help="tiny shapes, Triton interpreter, no timing")
    ap.add_argument("--ckpt", help="duo checkpoint directory: bytes per layer with its real masks and thresholds")
    ap.add_argument("--activations", help="with --ckpt: torch.save'd {'model.layers.{i}.{linear}': [T, K]} inputs")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    if args.ckpt:
        rows = checkpoint_report(args.ckpt, args.activations, batches)
        print_checkpoint(rows, batches)
        if args.out:
            write_json_atomic(args.out, {"ckpt": args.ckpt, "rows": rows})
        return 0

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.cpu_check:
        print("kernel_bench: no CUDA device; timings need a GPU. Use --cpu-check to run tiny shapes through "
              "the Triton interpreter (no timing) or --ckpt DIR for byte counts.", file=sys.stderr)
        return 2
    if args.cpu_check and not has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    from duo_vllm.kernels import triton_kernels as tk

    timed = not args.cpu_check
    models = TINY if args.cpu_check else {name: MODELS[name] for name in args.models.split(",")}
    sparsities = [_pair(s) for s in args.sparsities.split(",")]
    if args.cpu_check:
        batches = [b for b in batches if b in (1, 4, 16)] or [1]
        sparsities = sparsities[-2:]
    device = "cuda" if has_cuda else "cpu"
    dtype = DTYPES[args.dtype]

    print(HEADER)
    print("-" * len(HEADER))
    rows = []
    for (model, shapes), m, (p_w, p_x) in itertools.product(models.items(), batches, sparsities):
        for linear, n, k in shapes:
            case = run_case(tk, model, linear, n, k, m, p_w, p_x, dtype, device,
                            args.rep_ms if timed else None, seed=len(rows))
            for r in case:
                print(format_row(r), flush=True)
            rows += case
    bad = [r for r in rows if r["rel_err"] > MAX_REL_ERR]
    for r in bad:
        print(f"WRONG RESULT: {r}", file=sys.stderr)

    name = torch.cuda.get_device_name() if has_cuda else "cpu (Triton interpreter, no timing)"
    out = args.out or (None if args.cpu_check else "benchmarks/results/kernel_bench.json")
    if out:
        write_json_atomic(out, {"device": name, "dtype": args.dtype, "timed": timed, "rows": rows})
        print(f"wrote {out}")
    if args.write_table:
        if not timed:
            print("--write-table needs GPU timings; not written", file=sys.stderr)
        else:
            table = crossover_table(rows, *_pair(args.table_sparsity), name)
            if not table["shapes"]:
                print(f"--write-table: no rows at p_w:p_x = {args.table_sparsity}; not written", file=sys.stderr)
                return 1
            write_json_atomic(args.write_table, table)
            print(f"wrote {args.write_table}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
