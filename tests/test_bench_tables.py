"""The tables of benchmarks/heldout_choice.py: every stored cell, each with its number of seeds."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import heldout_choice  # noqa: E402

DUO = "duogpt, fixed (α 0.25, pre-prune)"


def _cell(ppl: float, nll_shift: float = 0.0) -> dict:
    nll = [math.log(ppl) + nll_shift * (i % 2 * 2 - 1) for i in range(8)]  # mean log(ppl), windows differ
    per = {d: v for d, v in zip(heldout_choice.PPL_DATASETS, (ppl, 2 * ppl))}
    return {"perplexity": per, "kl": {d: 0.5 for d in per}, "top1": {d: 0.6 for d in per},
            "window_nll": {d: [x + math.log(per[d] / ppl) for x in nll] for d in per}}


def test_tables_show_every_stored_cell_with_its_seeds():
    cells = {f"sparsegpt|W50+X50|{s}": _cell(100.0 + 10 * s, 0.1) for s in (0, 1)}
    cells |= {f"{DUO}|W50+X50|{s}": _cell(80.0 + 8 * s, 0.1) for s in (0, 1)}
    cells |= {"wanda|W50+X50|0": _cell(120.0), "sparsegpt|W30+X30|2": _cell(30.0)}
    levels, variants, seeds = heldout_choice.stored(cells)
    assert levels == ["W30+X30", "W50+X50"]  # LEVELS order, not insertion order
    assert variants == [DUO, "sparsegpt", "wanda"] and seeds == [0, 1, 2]
    table = heldout_choice.table({"cells": cells})
    wiki = table.split("Perplexity, held-out local:c4")[0]
    assert "| variant | W30+X30 | W50+X50 |" in wiki
    assert f"| {DUO} | – | 84.00 ± 4.00 [2] |" in wiki
    assert "| sparsegpt | 30.00 [1] | 105.00 ± 5.00 [2] |" in wiki
    assert "| wanda | – | 120.00 [1] |" in wiki
    # paired over both seeds: each seed's DuoGPT perplexity is 0.8x SparseGPT's, windows paired one to one
    assert f"| {DUO} | – | 0.800 (0.800–0.800) [2] |" in wiki
    against_wanda = wiki.split("Perplexity over wanda's")[1]
    assert re.search(rf"\| {re.escape(DUO)} \| – \| 0\.667 \(0\.6\d\d–0\.7\d\d\) \[1\] \|", against_wanda)  # seed 0 only
