"""Paired statistics for two models scored on the same documents (windows of text, task questions)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Series = Sequence[float] | Mapping[str, Sequence[float]]


def paired_bootstrap(a: Series, b: Series, resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a − b over paired documents, and its percentile bootstrap interval (documents resampled with
    replacement, each pair kept together). a and b are one value per document, or {stratum: values} (tasks):
    the statistic is then the mean over strata of each one's mean difference, documents resampled within their
    stratum. Returns {"mean", "low", "high", "documents"}."""
    a, b = (x if isinstance(x, Mapping) else {"": x} for x in (a, b))
    if a.keys() != b.keys() or not a:
        raise ValueError(f"paired_bootstrap needs the same strata on both sides, got {sorted(a)} and {sorted(b)}")
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(resamples, dtype=torch.float64)
    point, documents = 0.0, 0
    for key in a:
        x, y = (torch.as_tensor(v, dtype=torch.float64) for v in (a[key], b[key]))
        if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
            raise ValueError(f"paired_bootstrap{f' ({key})' if key else ''} needs two equal 1-D series of ≥ 2 "
                             f"documents, got {tuple(x.shape)} and {tuple(y.shape)}")
        d = x - y
        chunk = max(1, (1 << 22) // d.numel())  # resamples drawn at a time: index tensors of ≤ 32 MB
        for r in range(0, resamples, chunk):
            rows = min(chunk, resamples - r)
            means[r : r + rows] += d[torch.randint(0, d.numel(), (rows, d.numel()), generator=gen)].mean(1)
        point += float(d.mean())
        documents += d.numel()
    means /= len(a)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"mean": point / len(a), "low": low, "high": high, "documents": documents}


def perplexity_ratio(window_nll_a: Sequence[float], window_nll_b: Sequence[float], **bootstrap) -> dict:
    """Perplexity of model a over model b on the same equal-length windows (each window's mean NLL given), with
    the bootstrap interval of the ratio: exp of the paired mean difference of the windows' NLL."""
    diff = paired_bootstrap(window_nll_a, window_nll_b, **bootstrap)
    return {"ratio": math.exp(diff["mean"]), "low": math.exp(diff["low"]), "high": math.exp(diff["high"]),
            "documents": diff["documents"]}
