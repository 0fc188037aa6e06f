"""Calibration time and peak memory of duo-calibrate.

  python benchmarks/calib_bench.py --model smollm2 --nsamples 16 --seqlen 512          # CPU, real model
  python benchmarks/calib_bench.py --model llama2-7b-shape --nsamples 128 --seqlen 2048 # GPU, random weights

The 7B-shaped model has LLaMA-2-7B's decoder (hidden 4096, intermediate 11008, 32 layers, 32 heads) with
random bf16 weights and a 49152-token vocabulary, fed random tokens: it measures the solver and plumbing
cost at full size, not accuracy. Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from duo_vllm.files import write_json_atomic
from duo_vllm.calibrate.api import default_device
from duo_vllm.calibrate.models import default_test_model_dir, llama2_7b_shaped, load_model, load_tokenizer, prepare_test_model
from duo_vllm.calibrate.data import calibration_windows
from duo_vllm.calibrate.pipeline import calibrate_blocks
from duo_vllm.format import DuoConfig


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "llama2-7b-shape"])
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    p.add_argument("--method", default="duogpt")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="benchmarks/results/calib_bench.json")
    args = p.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    cfg = DuoConfig(method=args.method, nsamples=args.nsamples, seqlen=args.seqlen)

    if args.model == "smollm2":
        model_dir = prepare_test_model(default_test_model_dir())
        model = load_model(model_dir)
        ids = calibration_windows(load_tokenizer(model_dir), "local:c4", args.nsamples, args.seqlen, 0)
    else:
        if device.type != "cuda":
            print("calib_bench: the 7B-shaped run needs a CUDA device", file=sys.stderr)
            return 2
        model = llama2_7b_shaped(args.layers)
        ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    _, rows = calibrate_blocks(model, ids, cfg, device, log_line=lambda _s: None)
    seconds = time.time() - t0
    result = {
        "model": args.model, "layers": model.config.num_hidden_layers, "method": args.method,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "seconds_per_layer": round(seconds / model.config.num_hidden_layers, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "mean_rel_error": sum(r.rel_error for r in rows) / len(rows),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python"] + sys.argv),
    }
    print("| model | layers | method | samples x seqlen | device | time (s) | s/layer | peak GPU GiB | peak host GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {result['model']} | {result['layers']} | {args.method} | {args.nsamples} x {args.seqlen} | "
          f"{result['device_name']} | {result['seconds']} | {result['seconds_per_layer']} | {result['peak_gpu_gib']} | "
          f"{result['peak_host_rss_gib']} |")
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
