"""Accuracy under dual sparsity: methods x (weight, activation) sparsity on SmolLM2-135M-Instruct.

  python benchmarks/accuracy.py --nsamples 16 --seqlen 512 --limit 100

Each cell is calibrated with duo-calibrate's library API (same data and settings for every method),
then scored on
  - perplexity: held-out local:wiki, and local:c4 windows that overlap no calibration window
    (offline reference; thresholds applied);
  - zero-shot: lm-evaluation-harness on the tasks of `duo-eval zeroshot`, through in-process vLLM
    with quantization="duo" (the served code path), one fresh process per cell; compared on the tasks where
    the dense model is above chance, pair by pair on the same documents (bootstrap intervals);
  - KL divergence to the dense model and top-1 agreement with it on the held-out windows.
W0+X0 is the dense model for every method (zero sparsity leaves the weights and thresholds at zero),
so it is scored once. Results are written after every cell; a rerun skips cells already scored with
the same settings. Writes JSON, a markdown table and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_io import cached_checkpoint, command_line, markdown_table, save_figure

from duo_vllm.files import write_json_atomic, write_text_atomic
from duo_vllm.calibrate import data, models
from duo_vllm.evaluate import zeroshot
from duo_vllm.evaluate.perplexity import load_for_eval, reference, score_datasets
from duo_vllm.evaluate.stats import paired_bootstrap, perplexity_ratio
from duo_vllm.format import DuoConfig

LEVELS = {"W0+X0": (0.0, 0.0), "W30+X30": (0.3, 0.3), "W40+X40": (0.4, 0.4), "W50+X50": (0.5, 0.5),
          "W60+X60": (0.6, 0.6)}
METHODS = ("magnitude", "wanda", "sparsegpt", "duogpt")
DENSE = "dense model"
DENSE_SPEC = "dense"  # the dense model in --reference-check
PPL_DATASETS = ("local:wiki", "local:c4")


def zeroshot_in_subprocess(model: Path, args: argparse.Namespace, backend: str = "vllm") -> dict:
    """`duo-eval zeroshot --json` in a fresh process (each vLLM engine gets its own process and exits)."""
    result_file = Path(args.work) / f"zeroshot-{backend}-{model.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "duo_vllm.evaluate.cli", "zeroshot", str(model), "--out", str(result_file),
           "--backend", backend, "--tasks", *args.tasks, "--task-dir", str(Path(args.work) / "lm_eval_tasks")]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def score(model: Path, windows: dict, refs: dict, args: argparse.Namespace) -> dict:
    """Held-out perplexity, KL and top-1, and zero-shot through vLLM (with each choice's log-likelihood, which
    only the reference check reads and the stored cell drops)."""
    net = load_for_eval(model)
    held_out = score_datasets(net, windows, refs)
    del net
    zs = zeroshot_in_subprocess(model, args)
    return {**held_out, "zeroshot": zs["tasks"], "mean_acc": zs["mean_acc"]}


def without_logliks(cell: dict) -> dict:
    """The cell as stored: each task's scores without the per-choice log-likelihoods (the reference check's only)."""
    return {**cell, "zeroshot": {task: {k: v for k, v in scores.items() if k != "choice_loglik"}
                                 for task, scores in cell["zeroshot"].items()}}


def reference_check(vllm_tasks: dict, model: Path, args: argparse.Namespace) -> dict:
    """The served path against the offline reference on the same documents: each choice's log-likelihood
    (|difference| in nats, summed over the choice's tokens) and the documents whose decision differs. The dense
    model agrees to rounding. A thresholded model is discontinuous: the two paths sum in different orders, an
    activation within an ulp of its threshold falls on either side, and the step it makes perturbs every later
    layer, so on some documents the log-likelihoods can differ by whole nats (the reference differs from itself
    as much when only its batch size changes)."""
    ref = zeroshot_in_subprocess(model, args, "reference")["tasks"]
    tasks = {}
    for t, v in vllm_tasks.items():
        diffs = [abs(a - b) for dv, dr in zip(v["choice_loglik"], ref[t]["choice_loglik"], strict=True)
                 for a, b in zip(dv, dr, strict=True)]
        tasks[t] = {"vllm": v["acc"], "reference": ref[t]["acc"],
                    "flips": sum(a != b for a, b in zip(v["documents"], ref[t]["documents"], strict=True)),
                    "max_dloglik": max(diffs), "median_dloglik": statistics.median(diffs)}
    return {"tasks": tasks, "mean_acc": {"vllm": statistics.mean(v["acc"] for v in vllm_tasks.values()),
                                          "reference": statistics.mean(r["acc"] for r in ref.values())}}


def signal_tasks(dense: dict) -> dict[str, bool]:
    """Per task, whether the dense model is above chance by more than two standard errors (binomial) on its
    primary metric: only there can pruning methods be told apart."""
    out = {}
    for task, s in dense["zeroshot"].items():
        value, n = s[s.get("metric", "acc")], s["n"]
        out[task] = value - zeroshot.CHANCE[task] > 2 * math.sqrt(max(value * (1 - value), 1e-12) / n)
    return out


def primary(cell: dict, task: str) -> float:
    s = cell["zeroshot"][task]
    return s[s.get("metric", "acc")]


def paired_lines(result: dict, levels: list[str], signal: list[str]) -> list[str]:
    """DuoGPT against each baseline, pair by pair on the same documents: the mean over tasks with signal (points,
    tasks' documents resampled within each task) and wiki perplexity (windows resampled); 95 % bootstrap."""
    duo = result["cells"].get("duogpt", {})
    lines = ["| against | setting | mean over tasks with signal, points | wiki perplexity ratio |", "|---|---|---|---|"]
    for base in ("sparsegpt", "wanda"):
        for lv in levels:
            a, b = duo.get(lv), result["cells"].get(base, {}).get(lv)
            if a is None or b is None or "window_nll" not in a or "window_nll" not in b:
                continue
            acc = paired_bootstrap({t: a["zeroshot"][t]["documents"] for t in signal},
                                   {t: b["zeroshot"][t]["documents"] for t in signal}) if signal else None
            ppl = perplexity_ratio(a["window_nll"]["local:wiki"], b["window_nll"]["local:wiki"])
            acc_cell = (f"{100 * acc['mean']:+.2f} ({100 * acc['low']:+.2f} to {100 * acc['high']:+.2f})"
                        if acc else "–")
            lines.append(f"| {base} | {lv} | {acc_cell} | {ppl['ratio']:.3f} ({ppl['low']:.3f}–{ppl['high']:.3f}) |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in LEVELS if lv in result["levels"]]
    x = [LEVELS[lv][0] * 100 for lv in levels]
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = result["dense"]
    signal = [t for t, ok in signal_tasks(dense).items() if ok] or list(dense["zeroshot"])
    mean_score = lambda c: 100 * sum(primary(c, t) for t in signal) / len(signal)  # noqa: E731
    for method, cells in result["cells"].items():
        pts = [(xi, cells.get(lv) or (dense if lv == "W0+X0" else None)) for xi, lv in zip(x, levels)]
        pts = [(xi, c) for xi, c in pts if c]
        ax_acc.plot([p[0] for p in pts], [mean_score(p[1]) for p in pts], marker="o", label=method)
        ax_ppl.plot([p[0] for p in pts], [p[1]["perplexity"]["local:wiki"] for p in pts], marker="o", label=method)
    ax_acc.axhline(mean_score(dense), color="gray", ls="--", lw=1, label=DENSE)
    ax_ppl.axhline(dense["perplexity"]["local:wiki"], color="gray", ls="--", lw=1, label=DENSE)
    ax_acc.set(xlabel="weight = activation sparsity (%)", ylabel=f"mean zero-shot score (%, {len(signal)} tasks with signal)",
               title="Zero-shot accuracy (lm-eval, served path)")
    ax_ppl.set(xlabel="weight = activation sparsity (%)", ylabel="perplexity (local:wiki)", yscale="log",
               title="Held-out perplexity")
    for ax in (ax_acc, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"SmolLM2-135M-Instruct, calibration {result['calibration']['nsamples']}x"
                f"{result['calibration']['seqlen']} tokens, limit {result['zeroshot_limit']} docs/task")


def tables(result: dict) -> str:
    levels = [lv for lv in LEVELS if lv in result["levels"]]
    tasks = result["tasks"]
    signal = [t for t, ok in signal_tasks(result["dense"]).items() if ok and t in tasks]
    everything = [(DENSE, "W0+X0", result["dense"])] + [
        (m, lv, c) for m, cells in result["cells"].items()
        for lv, c in sorted(cells.items(), key=lambda kv: list(LEVELS).index(kv[0]))]
    rows_ppl, rows_acc, rows_kl = {}, {}, {}
    for method, lv, c in everything:
        rows_ppl.setdefault(method, {})[lv] = c["perplexity"]["local:wiki"]
        if signal:
            rows_acc.setdefault(method, {})[lv] = 100 * sum(primary(c, t) for t in signal) / len(signal)
        if "kl" in c and method != DENSE:
            rows_kl.setdefault(method, {})[lv] = c["kl"]["local:wiki"]
    metric = {t: zeroshot.PRIMARY_METRIC.get(t, "acc") for t in tasks}
    per_task = ["| method | setting | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | mean acc |",
                "|" + "---|" * (len(tasks) + 3)]
    per_task += [f"| {m} | {lv} | " + " | ".join(f"{100 * primary(c, t):.1f}" for t in tasks)
                 + f" | {100 * c['mean_acc']:.1f} |" for m, lv, c in everything]
    at_chance = [t for t in tasks if t not in signal]
    return "\n\n".join([
        "Perplexity, held-out local:wiki (lower is better; best per column in bold)",
        markdown_table(rows_ppl, levels, best="min"),
        "KL(dense ‖ model), nats per token on held-out local:wiki (lower is better)",
        markdown_table(rows_kl, levels, fmt="{:.3f}", best="min") if rows_kl else "–",
        f"Mean zero-shot score over the tasks with signal ({', '.join(signal) or 'none'}; primary metric, %; "
        f"best per column in bold). At chance for the dense model, so left out: {', '.join(at_chance) or 'none'}",
        markdown_table(rows_acc, levels, fmt="{:.1f}", best="max") if rows_acc else "–",
        "DuoGPT minus each baseline, paired on the same documents (95 % bootstrap interval)",
        "\n".join(paired_lines(result, levels, signal)),
        "Per-task scores (%; the last column is the mean plain accuracy over all tasks)", "\n".join(per_task),
        "The served path (vLLM) against the offline reference on the same documents", "\n".join(check_lines(result))])


def check_lines(result: dict) -> list[str]:
    lines = ["| model | mean acc, vLLM / reference | documents decided differently | choice log-likelihood "
             "\\|difference\\| in nats: the tasks' median median / max |", "|---|---|---|---|"]
    for spec, chk in result["reference_check"].items():
        if "tasks" not in chk:
            continue
        n = sum(len(result["dense"]["zeroshot"][t]["documents"]) for t in chk["tasks"])
        lines.append(f"| {spec} | {100 * chk['mean_acc']['vllm']:.2f} / {100 * chk['mean_acc']['reference']:.2f} | "
                     f"{sum(c['flips'] for c in chk['tasks'].values())} of {n} | "
                     f"{statistics.median(c['median_dloglik'] for c in chk['tasks'].values()):.2g} / "
                     f"{max(c['max_dloglik'] for c in chk['tasks'].values()):.2g} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--tasks", nargs="+", default=list(zeroshot.TASKS), choices=list(zeroshot.TASKS))
    p.add_argument("--limit", type=int, default=None, help="zero-shot documents per task (default: all)")
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=32768, help="held-out tokens per perplexity dataset")
    p.add_argument("--reference-check", nargs="*", default=[DENSE_SPEC, "duogpt:W50+X50"], metavar="METHOD:LEVEL",
                   help=f"cells ('{DENSE_SPEC}' for the dense model) also scored zero-shot through the offline "
                        "reference, to compare the served path with it document by document")
    p.add_argument("--work", default="build/accuracy", help="checkpoints and task files")
    p.add_argument("--out", default="benchmarks/results/accuracy.json")
    args = p.parse_args()
    out = Path(args.out)

    settings = {"calibration": {"dataset": data.DEFAULT_CALIBRATION, "nsamples": args.nsamples, "seqlen": args.seqlen},
                "zeroshot_limit": args.limit, "tasks": args.tasks, "ppl": {"seqlen": args.ppl_seqlen,
                                                                          "tokens": args.ppl_tokens}}
    old = json.loads(out.read_text()) if out.is_file() else {}
    same = all(old.get(k) == v for k, v in settings.items())
    result = {**settings, "model": "SmolLM2-135M-Instruct", "zeroshot_backend": "vllm (in-process, quantization=duo)",
              "levels": args.levels, "dense": old.get("dense") if same else None,
              "cells": old.get("cells", {}) if same else {}, "reference_check": old.get("reference_check", {}) if same else {},
              "command": command_line()}

    model_dir = models.prepare_test_model()
    tok = models.load_tokenizer(model_dir)
    exclude = (args.nsamples, args.seqlen, DuoConfig().seed)  # the c4 windows calibration drew
    windows = {name: data.evaluation_windows(tok, name, args.ppl_seqlen, args.ppl_tokens, exclude)
               for name in PPL_DATASETS}
    work = Path(args.work)
    dense = models.load_model(model_dir, torch.float32)
    refs = {name: reference(dense, w, progress=False) for name, w in windows.items()}  # ~3 GB per 32k tokens
    del dense
    if result["dense"] is None:
        print("scoring the dense model", flush=True)
        dense_cell = score(model_dir, windows, refs, args)
        if DENSE_SPEC in args.reference_check:
            result["reference_check"][DENSE_SPEC] = reference_check(dense_cell["zeroshot"], model_dir, args)
        result["dense"] = without_logliks(dense_cell)
        write_json_atomic(out, result)
    for level in args.levels:
        p_w, p_x = LEVELS[level]
        if p_w == 0 and p_x == 0:
            continue
        for method in args.methods:
            if level in result["cells"].get(method, {}):
                continue
            cfg = DuoConfig(method=method, weight_sparsity=p_w, act_sparsity=p_x, nsamples=args.nsamples,
                            seqlen=args.seqlen)
            t0 = time.time()
            ckpt = cached_checkpoint(work, model_dir, cfg)
            t1 = time.time()
            cell = score(ckpt, windows, refs, args)
            cell["checkpoint"] = str(ckpt)
            cell["seconds"] = {"calibrate": round(t1 - t0, 1), "score": round(time.time() - t1, 1)}
            if f"{method}:{level}" in args.reference_check:
                result["reference_check"][f"{method}:{level}"] = reference_check(cell["zeroshot"], ckpt, args)
            result["cells"].setdefault(method, {})[level] = without_logliks(cell)
            print(f"{method} {level}: ppl wiki {cell['perplexity']['local:wiki']:.2f} c4 "
                  f"{cell['perplexity']['local:c4']:.2f}, mean acc {100 * cell['mean_acc']:.2f}", flush=True)
            write_json_atomic(out, result)
    for spec in args.reference_check:  # cells scored before the check was asked for: score the served path again
        if spec == DENSE_SPEC:
            cell, ckpt = result["dense"], model_dir
        else:
            method, level = spec.split(":")
            cell = result["cells"].get(method, {}).get(level)
            ckpt = Path(cell["checkpoint"]) if cell else None
        if cell is None or "tasks" in result["reference_check"].get(spec, {}):
            continue
        result["reference_check"][spec] = reference_check(zeroshot_in_subprocess(ckpt, args)["tasks"], ckpt, args)
        write_json_atomic(out, result)

    result["table"] = tables(result)
    result["date"] = time.strftime("%Y-%m-%d")
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), f"<!-- {result['command']} ({result['date']}) -->\n\n{result['table']}\n")
    plot(result, out.with_suffix(".png"))
    print(result["table"])
    for spec, chk in result["reference_check"].items():
        if "tasks" in chk:
            print(f"reference check {spec}: mean acc vLLM {100 * chk['mean_acc']['vllm']:.2f} vs offline reference "
                  f"{100 * chk['mean_acc']['reference']:.2f}; documents decided differently "
                  f"{sum(c['flips'] for c in chk['tasks'].values())}; choice log-likelihoods differ by at most "
                  f"{max(c['max_dloglik'] for c in chk['tasks'].values()):.4f} nats")
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
