"""Held-out perplexity of a dense model or a duo checkpoint (through the offline reference)."""
from __future__ import annotations

import math
import os

import torch
from torch import nn
from tqdm import tqdm

from duo_vllm.calibrate import data, models
from duo_vllm.format import is_duo_checkpoint, read_config
from duo_vllm.reference import load_reference_model


def load_for_eval(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A duo checkpoint with its thresholds applied, or a plain model of a supported family."""
    if is_duo_checkpoint(path):
        return load_reference_model(path, dtype=dtype)
    return models.load_model(path, dtype=dtype)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over the windows (each scored on its own, from its first token)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    for i in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, dynamic_ncols=True):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def evaluate_perplexity(
    path: str | os.PathLike,
    dataset: str = data.DEFAULT_EVALUATION,
    seqlen: int = 2048,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of the model at `path` on held-out text; returns a JSON-ready dict.

    For a duo checkpoint scored on its own calibration text, windows that overlap calibration are skipped.
    """
    tokenizer = models.load_tokenizer(path)
    exclude = None
    if is_duo_checkpoint(path):
        cfg = read_config(path)
        if cfg.dataset == dataset:
            exclude = (cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = data.evaluation_windows(tokenizer, dataset, seqlen, max_tokens, exclude)
    model = load_for_eval(path)
    ppl = perplexity(model, windows, progress=progress)
    return {"model": str(path), "dataset": dataset, "seqlen": seqlen, "tokens": int(windows.numel()),
            "perplexity": ppl, "duo": is_duo_checkpoint(path)}
