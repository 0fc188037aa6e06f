"""Serving throughput: a duo checkpoint against its dense model, same vLLM settings, `vllm bench serve`.

  python benchmarks/serve_bench.py                                  # CPU: SmolLM2 vs its W50+X50 checkpoint
  python benchmarks/serve_bench.py --dense DIR --duo CKPT --input-len 512 --output-len 256 --prompts 64

Starts the dense model, then the duo checkpoint (`duo-serve`), each alone on the machine with the
same server arguments (this platform's engine settings, serve/engine.py), and drives each with vLLM's own client
(`vllm bench serve`, random dataset, fixed seed, --ignore-eos) at every --concurrency. Prints the
side-by-side table with duo/dense ratios and writes JSON + a PNG bar chart (--out).
Without --duo it calibrates SmolLM2 at W50+X50 (DuoGPT, 16x512) into --work first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_io import command_line, duo_checkpoint_arg, save_figure

from duo_vllm.files import write_json_atomic, write_text_atomic
from duo_vllm.calibrate import models
from duo_vllm.serve import engine
from duo_vllm.serve.server import ServerProcess, console_script

METRICS = {  # vllm bench serve result key -> column
    "median_ttft_ms": "TTFT ms",
    "median_tpot_ms": "TPOT ms",
    "median_itl_ms": "ITL ms",
    "output_throughput": "out tok/s",
}


def bench_one(model: str, server_argv: list[str], args: argparse.Namespace, label: str, result_dir: Path) -> dict:
    """Start one server, run `vllm bench serve` at each concurrency, stop it: {concurrency: result json}."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {}
    with ServerProcess(server_argv, log=result_dir / f"{label}-server.log", env=env) as server:
        server.wait_ready(args.timeout)
        for c in args.concurrency:
            name = f"{label}-c{c}.json"
            prompts = max(args.prompts, c) if args.prompts else max(8, 4 * c)
            cmd = [sys.executable, "-m", "duo_vllm.serve.vllm_cli", "bench", "serve", "--backend", "openai",
                   "--base-url", server.base_url, "--model", label, "--tokenizer", model,
                   "--dataset-name", "random", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(args.output_len), "--num-prompts", str(prompts),
                   "--max-concurrency", str(c), "--ignore-eos", "--seed", str(args.seed),
                   "--save-result", "--result-dir", str(result_dir), "--result-filename", name]
            print("+", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            run = json.loads((result_dir / name).read_text())
            if run["completed"] != prompts:
                raise RuntimeError(f"{label} c={c}: {run['completed']}/{prompts} requests completed")
            runs[c] = {k: run[k] for k in (*METRICS, "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "completed",
                                           "total_output_tokens", "duration")}
            print(f"{label} c={c}: " + ", ".join(f"{col} {run[k]:.2f}" for k, col in METRICS.items()), flush=True)
    return runs


def table(result: dict) -> str:
    head = "| concurrency | " + " | ".join(f"{col} dense | {col} duo | duo/dense" for col in METRICS.values()) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(METRICS))]
    for c in result["concurrency"]:
        d, s = result["dense"][str(c)], result["duo"][str(c)]
        cells = [f"{d[k]:.2f} | {s[k]:.2f} | {s[k] / d[k]:.2f}×" for k in METRICS]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = result["concurrency"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "median_tpot_ms", "median TPOT (ms, lower is better)"),
                           (axes[1], "output_throughput", "output tokens/s (higher is better)")):
        xs = range(len(conc))
        ax.bar([x - 0.2 for x in xs], [result["dense"][str(c)][key] for c in conc], 0.4, label="dense")
        ax.bar([x + 0.2 for x in xs], [result["duo"][str(c)][key] for c in conc], 0.4, label="duo")
        ax.set_xticks(list(xs), [f"concurrency {c}" for c in conc])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"{result['duo_checkpoint_name']} vs dense, {result['device']}, "
                f"in {result['input_len']} / out {result['output_len']} tokens")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default=None, help="dense model directory (default: the prepared SmolLM2)")
    p.add_argument("--duo", default=None, help="duo checkpoint of that model (default: calibrate one)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts", type=int, default=None, help="requests per run (default: max(8, 4 x concurrency))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--server-args", default="", help="extra vLLM server arguments for both servers (one string)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for a server to start")
    p.add_argument("--work", default="build/serve_bench")
    p.add_argument("--out", default="benchmarks/results/serve_bench.json")
    args = p.parse_args()

    dense = Path(args.dense) if args.dense else models.prepare_test_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    duo = duo_checkpoint_arg(p, "--duo", args.duo, work, dense, nsamples=16, seqlen=512)
    common = ["--max-model-len", str(args.max_model_len), *args.server_args.split()]
    # duo-serve adds this platform's engine settings itself; the dense server must run the same way
    # (the environment defaults, e.g. the CPU KV cache size, go into os.environ for both servers)
    common += engine.server_args(common, os.environ)
    results = {
        "dense": bench_one(str(dense), [sys.executable, "-m", "duo_vllm.serve.vllm_cli", "serve", str(dense),
                                        "--served-model-name", "dense", *common], args, "dense", work),
        "duo": bench_one(str(dense), [*console_script("duo-serve", "duo_vllm.serve.launch"), str(duo),
                                      "--served-model-name", "duo", *common], args, "duo", work),
    }
    result = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "command": command_line(),
              "dense_model": str(dense), "duo_checkpoint": str(duo), "duo_checkpoint_name": duo.name,
              "server_args": common, "input_len": args.input_len, "output_len": args.output_len,
              "concurrency": args.concurrency,
              "dense": {str(c): r for c, r in results["dense"].items()},
              "duo": {str(c): r for c, r in results["duo"].items()}}
    result["ratios"] = {str(c): {k: result["duo"][str(c)][k] / result["dense"][str(c)][k] for k in METRICS}
                        for c in args.concurrency}
    result["table"] = table(result)
    out = Path(args.out)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), f"<!-- {result['command']} ({result['date']}, {result['device']}) -->\n\n"
               f"{result['table']}\n")
    plot(result, out.with_suffix(".png"))
    print(result["table"])
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
