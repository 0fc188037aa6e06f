"""Held-out perplexity of a dense model or a duo checkpoint (through the offline reference)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


@dataclass
class Reference:
    """The dense model's next-token distributions on a set of windows: what a compressed model is compared with."""

    logprobs: torch.Tensor  # [windows, seqlen - 1, vocab] log-softmax, float16 (half the memory; KL to ~1e-3)
    top1: torch.Tensor  # [windows, seqlen - 1] its argmax, from the float32 logits


@dataclass
class WindowScores:
    """Per-window sums of next-token scores (every window has the same number of scored tokens)."""

    nll: torch.Tensor  # [windows] summed negative log-likelihood
    tokens_per_window: int
    kl: torch.Tensor | None = None  # [windows] summed KL(reference ‖ model), with a Reference
    top1: torch.Tensor | None = None  # [windows] tokens whose argmax is the reference's

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum()) / (self.nll.numel() * self.tokens_per_window))

    def summary(self) -> dict:
        """JSON-ready: perplexity, mean KL per token and top-1 agreement (with a reference), and each window's mean
        NLL (for paired statistics between models scored on the same windows)."""
        n = self.nll.numel() * self.tokens_per_window
        out = {"perplexity": self.perplexity, "window_nll": (self.nll / self.tokens_per_window).tolist()}
        if self.kl is not None:
            out |= {"kl": float(self.kl.sum()) / n, "top1": float(self.top1.sum()) / n}
        return out


def _batches(model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool, desc: str):
    """(window slice, its ids, float32 next-token logits [b, seqlen - 1, vocab]) per batch."""
    device = next(model.parameters()).device
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress,
                  dynamic_ncols=True):
        ids = windows[i : i + batch_size].to(device)
        yield slice(i, i + ids.shape[0]), ids, model(ids, use_cache=False).logits[:, :-1].float()


@torch.no_grad()
def reference(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> Reference:
    """The (dense) model's distributions on `windows`, kept on the CPU."""
    logprobs, top1 = [], []
    for _, _, logits in _batches(model, windows, batch_size, progress, "reference"):
        top1.append(logits.argmax(-1).cpu())
        logprobs.append(torch.log_softmax(logits, -1).to(torch.float16).cpu())
    return Reference(torch.cat(logprobs), torch.cat(top1))


@torch.no_grad()
def score_windows(model: nn.Module, windows: torch.Tensor, ref: Reference | None = None, batch_size: int = 4,
                  progress: bool = True) -> WindowScores:
    """Each window's summed next-token NLL (scored on its own, from its first token), and with `ref` (the same
    windows) its summed KL(ref ‖ model) and top-1 agreement."""
    if ref is not None and ref.top1.shape != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"the reference holds {tuple(ref.top1.shape)} scored tokens, the windows "
                         f"{windows.shape[0]} x {windows.shape[1] - 1}")
    nll, kl, top1 = [], [], []
    for rows, ids, logits in _batches(model, windows, batch_size, progress, "perplexity"):
        logq = torch.log_softmax(logits, -1)
        nll.append(-logq.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1).double().cpu())
        if ref is not None:
            logp = ref.logprobs[rows].to(logq.device, torch.float32)
            kl.append((logp.exp() * (logp - logq)).sum(-1).sum(1).double().cpu())
            top1.append((logq.argmax(-1).cpu() == ref.top1[rows]).sum(1))
    return WindowScores(torch.cat(nll), windows.shape[1] - 1, torch.cat(kl) if kl else None,
                        torch.cat(top1) if top1 else None)


def score_datasets(model: nn.Module, windows: dict[str, torch.Tensor], refs: dict[str, Reference]) -> dict:
    """`score_windows(...).summary()` on each dataset's windows against its reference, as {field: {dataset:
    value}} (the layout the benchmarks' JSON cells keep)."""
    scores = {name: score_windows(model, w, refs[name], progress=False).summary() for name, w in windows.items()}
    return {field: {name: sc[field] for name, sc in scores.items()} for field in next(iter(scores.values()))}


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over the windows (each scored on its own, from its first token)."""
    return score_windows(model, windows, batch_size=batch_size, progress=progress).perplexity


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
