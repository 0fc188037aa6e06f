"""Held-out perplexity of SmolLM2-135M-Instruct under each method at W50+X50, W50+X0 and W0+X50.

  python benchmarks/ppl_table.py --nsamples 64 --seqlen 512 --eval-tokens 65536

Calibrates every (method, sparsity) cell with duo-calibrate's library API (same data, same settings),
scores it on held-out text through the offline reference, prints a markdown table and writes JSON.
Checkpoints go to --work (reused when they exist with the same settings).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from bench_io import cached_checkpoint, command_line, markdown_table

from duo_vllm.files import write_json_atomic
from duo_vllm.calibrate import data, models
from duo_vllm.evaluate.perplexity import load_for_eval, perplexity
from duo_vllm.format import DuoConfig

SETTINGS = {"W50+X50": (0.5, 0.5), "W50+X0": (0.5, 0.0), "W0+X50": (0.0, 0.5)}
METHODS = ("duogpt", "sparsegpt", "wanda", "magnitude", "teal")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-dataset", default="local:wiki")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--work", default="build/ppl_table")
    p.add_argument("--out", default="benchmarks/results/ppl_table.json")
    args = p.parse_args()

    model_dir = models.prepare_test_model()
    windows = data.evaluation_windows(models.load_tokenizer(model_dir), args.eval_dataset, args.eval_seqlen,
                                      args.eval_tokens)
    dense_ppl = perplexity(models.load_model(model_dir, torch.float32), windows)
    cells: dict[str, dict[str, float]] = {}
    for setting in args.settings:
        p_w, p_x = SETTINGS[setting]
        for method in args.methods:
            if (method == "teal") != (p_w == 0):  # teal is the thresholds-only method: W0 cells only
                continue
            cfg = DuoConfig(method=method, weight_sparsity=p_w, act_sparsity=p_x, nsamples=args.nsamples,
                            seqlen=args.seqlen)
            ckpt = cached_checkpoint(Path(args.work), model_dir, cfg)
            cells.setdefault(method, {})[setting] = perplexity(load_for_eval(ckpt), windows)

    dense_row = "| dense model | " + " | ".join(f"{dense_ppl:.2f}" for _ in args.settings) + " |"
    header, rule, *rows = markdown_table(cells, args.settings, best="min").split("\n")
    table = "\n".join([header, rule, dense_row, *rows])
    print(table)
    result = {"model": "SmolLM2-135M-Instruct", "calibration": {"dataset": "local:c4", "nsamples": args.nsamples,
              "seqlen": args.seqlen}, "evaluation": {"dataset": args.eval_dataset, "seqlen": args.eval_seqlen,
              "tokens": int(windows.numel())}, "dense_perplexity": dense_ppl, "perplexity": cells,
              "table": table, "date": time.strftime("%Y-%m-%d"), "command": command_line()}
    write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
