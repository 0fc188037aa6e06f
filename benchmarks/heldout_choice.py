"""DuoGPT with α and damping chosen per linear on held-out calibration tokens, against the fixed settings it had
before (α 0.25, pre-prune residual weights, no split) and the baselines: held-out perplexity on SmolLM2-135M.

  python benchmarks/heldout_choice.py --nsamples 16 --seqlen 512 --levels W30+X30 W50+X50 --seeds 0

Every variant of a (level, seed) cell calibrates on the same tokens (the seed draws the c4 windows). Scored on
held-out local:wiki and on local:c4 windows that overlap no calibration window of that seed (offline reference,
thresholds applied). Prints a table (mean over seeds, ± half the range), writes JSON; checkpoints are cached
in --work, a rerun scores only what is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_io import cached_checkpoint

from duo_vllm.calibrate import data, models
from duo_vllm.evaluate.perplexity import load_for_eval, perplexity
from duo_vllm.files import write_json_atomic, write_text_atomic
from duo_vllm.format import DuoConfig

LEVELS = {"W30+X30": 0.3, "W40+X40": 0.4, "W50+X50": 0.5, "W60+X60": 0.6}
VARIANTS = {  # name -> DuoConfig fields beyond the level and calibration data
    "duogpt, held-out choice": {"method": "duogpt", "holdout": 0.25, "residual_weights": "original"},
    "duogpt, fixed (α 0.25, pre-prune)": {"method": "duogpt", "holdout": 0.0, "alpha": 0.25,
                                          "residual_weights": "pre_prune"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda": {"method": "wanda"},
}
PPL_DATASETS = ("local:wiki", "local:c4")


def table(result: dict) -> str:
    lines = []
    for dataset in PPL_DATASETS:
        lines += [f"Perplexity, held-out {dataset} (mean over seeds {result['seeds']}, ± half the range)", "",
                  "| variant | " + " | ".join(result["levels"]) + " |", "|" + "---|" * (len(result["levels"]) + 1)]
        for variant in result["variants"]:
            cells = []
            for level in result["levels"]:
                vals = [result["cells"][f"{variant}|{level}|{s}"]["perplexity"][dataset] for s in result["seeds"]
                        if f"{variant}|{level}|{s}" in result["cells"]]
                cells.append(f"{statistics.mean(vals):.2f} ± {(max(vals) - min(vals)) / 2:.2f}" if vals else "–")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--levels", nargs="+", default=["W30+X30", "W50+X50"], choices=list(LEVELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=32768, help="held-out tokens per perplexity dataset")
    p.add_argument("--work", default="build/heldout_choice")
    p.add_argument("--out", default="benchmarks/results/heldout_choice.json")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    old = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "ppl_seqlen": args.ppl_seqlen,
                "ppl_tokens": args.ppl_tokens}
    cells = old.get("cells", {}) if old.get("settings") == settings else {}
    result = {"settings": settings, "levels": args.levels, "variants": args.variants, "seeds": args.seeds,
              "cells": cells, "command": " ".join(["python", *sys.argv])}
    model_dir = models.prepare_test_model()
    tok = models.load_tokenizer(model_dir)
    for seed in args.seeds:
        windows = {name: data.evaluation_windows(tok, name, args.ppl_seqlen, args.ppl_tokens,
                                                 (args.nsamples, args.seqlen, seed)) for name in PPL_DATASETS}
        for level in args.levels:
            for variant in args.variants:
                key = f"{variant}|{level}|{seed}"
                if key in cells:
                    continue
                cfg = DuoConfig(**VARIANTS[variant], weight_sparsity=LEVELS[level], act_sparsity=LEVELS[level],
                                nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
                t0 = time.time()
                name = f"{variant.split(',')[0]}-{'fixed' if 'fixed' in variant else 'default'}-{level}-s{seed}"
                ckpt = cached_checkpoint(work, model_dir, cfg, name)
                t1 = time.time()
                net = load_for_eval(ckpt)
                cells[key] = {"perplexity": {n: perplexity(net, w, progress=False) for n, w in windows.items()},
                              "checkpoint": str(ckpt), "seconds": {"calibrate": round(t1 - t0, 1),
                                                                   "score": round(time.time() - t1, 1)}}
                del net
                print(f"{key}: " + ", ".join(f"{n} {v:.2f}" for n, v in cells[key]["perplexity"].items()), flush=True)
                write_json_atomic(out, result)
    result["date"] = time.strftime("%Y-%m-%d")
    result["table"] = table(result)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), f"<!-- {result['command']} ({result['date']}) -->\n\n{result['table']}\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
