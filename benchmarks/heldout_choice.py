"""DuoGPT's settings side by side (α and damping chosen per linear on held-out calibration tokens, with the final
fit on all tokens or on the kept split only; fixed α with each residual-weight choice) against SparseGPT and
Wanda: held-out perplexity, KL to the dense model and top-1 agreement on SmolLM2-135M.

  python benchmarks/heldout_choice.py --nsamples 64 --seqlen 512 --levels W30+X30 W50+X50 --seeds 0

Every variant of a (level, seed) cell calibrates on the same tokens (the seed draws the c4 windows). Scored on
held-out local:wiki and on local:c4 windows that overlap no calibration window of that seed (offline reference,
thresholds applied), against the dense model's distributions on the same windows; perplexity ratios to each
baseline are paired over the windows (bootstrap interval). Prints tables (mean over seeds, ± half the range) of
every cell stored with the same settings, writes JSON; checkpoints are cached in --work, a rerun scores only what
is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_io import cached_checkpoint, command_line

from duo_vllm.calibrate import data, models
from duo_vllm.evaluate.perplexity import load_for_eval, reference, score_datasets
from duo_vllm.evaluate.stats import perplexity_ratio
from duo_vllm.files import write_json_atomic, write_text_atomic
from duo_vllm.format import DuoConfig
from duo_vllm.kernels.cpu_kernel import cpu_name

LEVELS = {"W30+X30": 0.3, "W40+X40": 0.4, "W50+X50": 0.5, "W60+X60": 0.6}
VARIANTS = {  # name -> (checkpoint name, DuoConfig fields beyond the level and calibration data)
    "duogpt, held-out choice": ("duogpt-heldout", {"method": "duogpt", "holdout": 0.25,
                                                   "residual_weights": "original"}),
    "duogpt, held-out choice, kept-split fit": ("duogpt-heldout-kept", {"method": "duogpt", "holdout": 0.25,
                                                                   "residual_weights": "original",
                                                                   "final_fit": "kept"}),
    "duogpt, fixed (α 0.25, pre-prune)": ("duogpt-fixed", {"method": "duogpt", "holdout": 0.0, "alpha": 0.25,
                                                           "residual_weights": "pre_prune"}),
    "duogpt, α 0.25, original": ("duogpt-a0.25-original", {"method": "duogpt", "holdout": 0.0, "alpha": 0.25,
                                                           "residual_weights": "original"}),
    "duogpt, α 1, original (exact)": ("duogpt-a1-original", {"method": "duogpt", "holdout": 0.0, "alpha": 1.0,
                                                             "residual_weights": "original"}),
    "duogpt, α 1, compressed target": ("duogpt-a1-compressed", {"method": "duogpt", "holdout": 0.0, "alpha": 1.0,
                                                                "residual_weights": "original",
                                                                "residual_target": "compressed"}),
    "sparsegpt": ("sparsegpt", {"method": "sparsegpt"}),
    "wanda": ("wanda", {"method": "wanda"}),
    # as the papers calibrate: weights fit on dense inputs, thresholds applied only when served
    "sparsegpt, paper-style (dense inputs)": ("sparsegpt-dense-inputs", {"method": "sparsegpt",
                                                                         "calibration_inputs": "dense"}),
    "wanda, paper-style (dense inputs)": ("wanda-dense-inputs", {"method": "wanda", "calibration_inputs": "dense"}),
}
PPL_DATASETS = ("local:wiki", "local:c4")
BASELINES = ("sparsegpt", "wanda")  # what the DuoGPT variants are compared with, pair by pair


def stored(cells: dict) -> tuple[list[str], list[str], list[int]]:
    """The levels, variants and seeds that have cells, in LEVELS and VARIANTS order: the tables show everything
    scored with these settings, whichever invocation scored it."""
    keys = [k.split("|") for k in cells]
    return ([lv for lv in LEVELS if any(k[1] == lv for k in keys)], [v for v in VARIANTS if any(k[0] == v for k in keys)],
            sorted({int(k[2]) for k in keys}))


def _cells(cells: dict, seeds: list[int], variant: str, level: str) -> list[dict]:
    return [cells[k] for s in seeds if (k := f"{variant}|{level}|{s}") in cells]


def _spread(vals: list[float], fmt: str) -> str:
    """Mean ± half the range over seeds (one seed: its value)."""
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format((max(vals) - min(vals)) / 2)}"


def table(result: dict) -> str:
    levels, variants, seeds = stored(result["cells"])
    head, rule = "| variant | " + " | ".join(levels) + " |", "|" + "---|" * (len(levels) + 1)
    lines = []
    for dataset in PPL_DATASETS:
        lines += [f"Perplexity, held-out {dataset}: mean over seeds ± half the range [seeds in the cell]", "", head,
                  rule]
        for v in variants:
            got = [_cells(result["cells"], seeds, v, lv) for lv in levels]
            lines.append(f"| {v} | " + " | ".join(f"{_spread([c['perplexity'][dataset] for c in g], '{:.2f}')} "
                                                  f"[{len(g)}]" if g else "–" for g in got) + " |")
        lines += ["", f"KL(dense ‖ model) in nats per token / top-1 agreement with the dense model, held-out {dataset}",
                  "", head, rule]
        for v in variants:
            cells = []
            for lv in levels:
                got = [c for c in _cells(result["cells"], seeds, v, lv) if "kl" in c]
                cells.append(f"{_spread([c['kl'][dataset] for c in got], '{:.3f}')} / "
                             f"{_spread([100 * c['top1'][dataset] for c in got], '{:.1f}')} % [{len(got)}]"
                             if got else "–")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        for base in BASELINES:
            if base not in variants:
                continue
            lines += ["", f"Perplexity over {base}'s, held-out {dataset}: paired over the same windows (all seeds "
                      "both have), 95 % bootstrap interval [seeds]", "", head, rule]
            for v in variants:
                if v in BASELINES:
                    continue
                cells = []
                for lv in levels:
                    pairs = [(result["cells"][f"{v}|{lv}|{s}"], result["cells"][f"{base}|{lv}|{s}"])
                             for s in seeds if all(f"{m}|{lv}|{s}" in result["cells"] for m in (v, base))]
                    pairs = [(a, b) for a, b in pairs if "window_nll" in a and "window_nll" in b]
                    if not pairs:
                        cells.append("–")
                        continue
                    r = perplexity_ratio([x for a, _ in pairs for x in a["window_nll"][dataset]],
                                         [x for _, b in pairs for x in b["window_nll"][dataset]])
                    cells.append(f"{r['ratio']:.3f} ({r['low']:.3f}–{r['high']:.3f}) [{len(pairs)}]")
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
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
    result = {"settings": settings, "cells": cells, "command": command_line()}
    model_dir = models.prepare_test_model()
    tok = models.load_tokenizer(model_dir)
    for seed in args.seeds:
        windows = {name: data.evaluation_windows(tok, name, args.ppl_seqlen, args.ppl_tokens,
                                                 (args.nsamples, args.seqlen, seed)) for name in PPL_DATASETS}
        todo = [(lv, v) for lv in args.levels for v in args.variants if "kl" not in cells.get(f"{v}|{lv}|{seed}", {})]
        if not todo:
            continue
        dense = models.load_model(model_dir, torch.float32)
        refs = {name: reference(dense, w, progress=False) for name, w in windows.items()}  # ~1.6 GB per 16k tokens
        del dense
        for level, variant in todo:
            key = f"{variant}|{level}|{seed}"
            slug, fields = VARIANTS[variant]
            cfg = DuoConfig(**fields, weight_sparsity=LEVELS[level], act_sparsity=LEVELS[level],
                            nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
            t0 = time.time()
            ckpt = cached_checkpoint(work, model_dir, cfg, f"{slug}-{level}-s{seed}")
            t1 = time.time()
            net = load_for_eval(ckpt)
            scores = score_datasets(net, windows, refs)
            del net
            calibrate_s = cells.get(key, {}).get("seconds", {}).get("calibrate", round(t1 - t0, 1))  # a rescore
            cells[key] = {**scores, "checkpoint": str(ckpt), "host": f"{cpu_name()}, {torch.get_num_threads()} threads",
                          "seconds": {"calibrate": calibrate_s, "score": round(time.time() - t1, 1)}}
            print(f"{key}: " + ", ".join(f"{n} {scores['perplexity'][n]:.2f} (KL {scores['kl'][n]:.3f}, "
                                         f"top-1 {scores['top1'][n]:.3f})" for n in windows), flush=True)
            write_json_atomic(out, result)
    result["date"] = time.strftime("%Y-%m-%d")
    result["table"] = table(result)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), f"<!-- {result['command']} ({result['date']}) -->\n\n{result['table']}\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
