"""Calibration time and peak memory of duo-calibrate, quiet and beside a competing CPU-bound process.

  python benchmarks/calib_bench.py --model smollm2 --nsamples 16 128 --threads 1 2 --blocks 4
  python benchmarks/calib_bench.py --model llama2-7b-shape --nsamples 128 --seqlen 2048 # GPU, random weights

Each configuration (samples, threads, competitor) runs in its own child process, so peak host memory
is that configuration's. "busy" runs one single-threaded Python busy loop beside it for the whole
calibration (one other CPU-bound process, as on a shared 2-core machine). --blocks calibrates only the
first blocks of the model: the time per block is the figure, and every block of SmolLM2 has the same
shapes. The 7B-shaped model has LLaMA-2-7B's decoder (hidden 4096, intermediate 11008, 32 layers, 32 heads)
with random bf16 weights, fed random tokens: it measures the solver and plumbing at full size, not accuracy.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

import torch

from bench_io import command_line

from duo_vllm.calibrate.api import default_device
from duo_vllm.calibrate.data import calibration_windows
from duo_vllm.calibrate.models import default_test_model_dir, llama2_7b_shaped, load_model, load_tokenizer, prepare_test_model
from duo_vllm.calibrate.pipeline import calibrate_blocks
from duo_vllm.files import write_json_atomic
from duo_vllm.format import DuoConfig
from duo_vllm.kernels import cpu_kernel

BUSY_LOOP = "while True: pass"


def run_one(model_name: str, blocks: int | None, method: str, nsamples: int, seqlen: int, threads: int,
            device: torch.device) -> dict:
    """Calibrate once in this process; the figures of that run."""
    torch.set_num_threads(threads)
    cfg = DuoConfig(method=method, nsamples=nsamples, seqlen=seqlen)
    if model_name == "smollm2":
        model_dir = prepare_test_model(default_test_model_dir())
        model = load_model(model_dir)
        ids = calibration_windows(load_tokenizer(model_dir), "local:c4", nsamples, seqlen, 0)
    else:
        model = llama2_7b_shaped(blocks or 32)
        ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    if blocks is not None:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = len(model.model.layers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    _, rows = calibrate_blocks(model, ids, cfg, device, log_line=lambda _s: None)
    seconds = time.time() - t0
    n = model.config.num_hidden_layers
    return {
        "blocks": n, "nsamples": nsamples, "seqlen": seqlen, "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1), "seconds_per_block": round(seconds / n, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "mean_rel_error": sum(r.rel_error for r in rows) / len(rows),
    }


def run_child(args: argparse.Namespace, nsamples: int, threads: int, competitor: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--method", args.method,
           "--nsamples", str(nsamples), "--seqlen", str(args.seqlen), "--threads", str(threads)]
    cmd += ["--blocks", str(args.blocks)] if args.blocks else []
    cmd += ["--device", args.device] if args.device else []
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if competitor == "busy" else None
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {**json.loads(out.strip().splitlines()[-1]), "competitor": competitor}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama2-7b-shape"])
    p.add_argument("--blocks", type=int, default=None, help="calibrate only the first N decoder blocks")
    p.add_argument("--method", default="duogpt")
    p.add_argument("--nsamples", type=int, nargs="+", default=[16])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--competitor", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"],
                   help="quiet: nothing else runs; busy: one CPU-bound process runs beside the calibration")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="benchmarks/results/calib_bench.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    if args.model == "llama2-7b-shape" and device.type != "cuda":
        print("calib_bench: the 7B-shaped run needs a CUDA device", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(run_one(args.model, args.blocks, args.method, args.nsamples[0], args.seqlen,
                                 args.threads[0], device)))
        return 0

    rows = []
    print("| model | blocks | samples x seqlen | threads | competitor | s/block | peak host GiB | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for nsamples, threads, competitor in itertools.product(args.nsamples, args.threads, args.competitor):
        r = run_child(args, nsamples, threads, competitor)
        rows.append(r)
        print(f"| {args.model} | {r['blocks']} | {nsamples} x {args.seqlen} | {r['threads']} | {competitor} | "
              f"{r['seconds_per_block']} | {r['peak_host_rss_gib']} | {r['peak_gpu_gib']} |", flush=True)
    write_json_atomic(args.out, {
        "model": args.model, "method": args.method, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_kernel.cpu_name(),
        "rows": rows, "date": time.strftime("%Y-%m-%d"), "command": command_line(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
