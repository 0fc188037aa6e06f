"""Shared by the benchmark scripts: cached calibrations, markdown tables, the command a result records."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from duo_vllm.calibrate.api import calibrate
from duo_vllm.format import DuoConfig, is_duo_checkpoint, read_config


def cached_checkpoint(work: Path, model_dir: Path, cfg: DuoConfig, name: str | None = None) -> Path:
    """The checkpoint of `cfg` under `work` (in `name`, default from the method and sparsities), calibrated only if
    no checkpoint with the same settings is there."""
    out = work / (name or f"{cfg.method}-w{cfg.weight_sparsity}-x{cfg.act_sparsity}")
    if is_duo_checkpoint(out) and read_config(out) == cfg:
        return out
    return calibrate(model_dir, out, cfg, force=True)


def duo_checkpoint_arg(parser: argparse.ArgumentParser, flag: str, given: str | None, work: Path,
                       model_dir: Path, nsamples: int, seqlen: int) -> Path:
    """The duo checkpoint given as `flag` (a usage error if it is none), or `model_dir` calibrated at W50+X50
    with DuoGPT on nsamples x seqlen tokens into `work` (cached)."""
    if given:
        if not is_duo_checkpoint(given):
            parser.error(f"{flag} {given}: not a duo checkpoint (no quantization_config with quant_method 'duo')")
        return Path(given)
    return cached_checkpoint(work, model_dir, DuoConfig(method="duogpt", weight_sparsity=0.5, act_sparsity=0.5,
                                                        nsamples=nsamples, seqlen=seqlen))


def markdown_table(rows: dict[str, dict[str, float]], columns: list[str], fmt: str = "{:.2f}",
                   best: str = "min") -> str:
    """rows[name][column] -> value; the best value of each column (min or max) in bold, '–' where missing."""
    pick = min if best == "min" else max
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        cells = []
        for col in columns:
            if col not in row:
                cells.append("–")
                continue
            top = pick(r[col] for r in rows.values() if col in r)
            cells.append(("**" + fmt + "**" if row[col] == top else fmt).format(row[col]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out and write a matplotlib figure as PNG (temporary file, then rename), then close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def command_line() -> str:
    """This run's command, shell-quoted so that it can be pasted (some arguments hold spaces)."""
    return shlex.join(["python", *sys.argv])
