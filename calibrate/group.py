"""Calibrating one group of linears that share an input (q/k/v, o, gate/up, down): the algorithm.

Given the group's weights and its inputs on the calibration tokens, in both streams (X̂: the partially
compressed model's, before thresholding; X̃: the original model's), it picks the group's threshold,
accumulates the input statistics once and prunes every linear of the group with the configured method.
No modules, hooks or devices beyond the tensors it is given: calibrate.pipeline feeds it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from duo_vllm.calibrate import solver
from duo_vllm.calibrate.methods import prune_weight
from duo_vllm.format import DuoConfig, LayerRecord, apply_threshold

QUANTILE_SAMPLE = 1 << 24  # entries kept per group for the threshold quantile (exact below this)
ALPHAS = (0.0, 0.25, 0.5, 1.0)  # DuoGPT's held-out candidates at --percdamp (0: SparseGPT's solve)
DAMPED_ALPHAS = (0.5, 1.0)  # also tried at DAMP_FACTOR x --percdamp: more damping tames a large α's overfit
DAMP_FACTOR = 10


class CalibrationError(ValueError):
    """A block that cannot be calibrated (non-finite weights or statistics, out of memory); the message names
    the linear."""


@dataclass
class GroupResult:
    threshold: float
    weights: dict[str, torch.Tensor]  # linear name -> its new weight (dtype of the input weight)
    records: list[LayerRecord]


def sampled_quantile_threshold(xs: list[torch.Tensor], sparsity: float, gen: torch.Generator) -> float:
    """The threshold zeroing a fraction `sparsity` of |x| over all samples, from at most QUANTILE_SAMPLE
    entries drawn with `gen` (exact below that)."""
    if sparsity <= 0:
        return 0.0
    keep = max(1, QUANTILE_SAMPLE // len(xs))
    samples = []
    for x in xs:
        x = x.reshape(-1)
        if x.numel() > keep:
            x = x[torch.randint(0, x.numel(), (keep,), generator=gen).to(x.device)]
        samples.append(x.float().cpu())
    return solver.activation_threshold(torch.cat(samples), sparsity)


def holdout_split(n_samples: int, holdout: float) -> list[bool]:
    """Which calibration sequences are held out (True): every round(1 / holdout)-th, none for holdout 0."""
    if holdout <= 0:
        return [False] * n_samples
    every = max(2, round(1 / holdout))
    return [i % every == every - 1 for i in range(n_samples)]


def choose_on_heldout(W: torch.Tensor, fit: solver.InputStats, held: solver.InputStats,
                      cfg: DuoConfig) -> tuple[DuoConfig, float, float | None]:
    """(the settings to fit W with on all tokens, the held-out error of its fit on `fit`, SparseGPT's).

    DuoGPT tries each α in ALPHAS at --percdamp and DAMPED_ALPHAS at DAMP_FACTOR times it, fit on `fit`,
    and keeps the one whose layer error on `held` is lowest (α = 0 is SparseGPT's solve, so no linear ends
    worse than SparseGPT there). Other methods have nothing to choose: their held-out error is reported.
    """
    if cfg.method != "duogpt":
        return cfg, solver.reconstruction_error(prune_weight(W, fit, cfg), W, held), None
    runs = {cfg.percdamp: ALPHAS}
    if cfg.percdamp * DAMP_FACTOR != cfg.percdamp:
        runs[cfg.percdamp * DAMP_FACTOR] = DAMPED_ALPHAS
    errors = {}
    for damp, alphas in runs.items():
        fits = solver.prune_candidates(W, fit.H, fit.G, fit.a, cfg.weight_sparsity, list(alphas), cfg.blocksize,
                                       damp, cfg.residual_weights, cfg.mask_score)
        for alpha, W_fit in zip(alphas, fits):
            errors[(alpha, damp)] = solver.reconstruction_error(W_fit, W, held)
    alpha, damp = min(errors, key=errors.get)
    return cfg.model_copy(update={"alpha": alpha, "percdamp": damp}), errors[(alpha, damp)], errors[(0.0, cfg.percdamp)]


def calibrate_group(weights: dict[str, torch.Tensor], xs: list[torch.Tensor], xs_original: list[torch.Tensor],
                    cfg: DuoConfig, gen: torch.Generator, layer: int, device: torch.device,
                    log_line: Callable[[str], None]) -> GroupResult:
    """Threshold, statistics and pruned weights for the linears `weights` (name -> weight, on `device`) of
    decoder block `layer`, whose input is xs (compressed stream) per sample; xs_original is what the residual term
    aims at (the original stream's input, or xs again with --residual-target compressed).
    With cfg.holdout, each linear's settings are chosen on a held-out split first (choose_on_heldout), then the
    weights are fit on cfg.final_fit's tokens."""
    first = next(iter(weights))
    t = sampled_quantile_threshold(xs, cfg.act_sparsity, gen)
    k = weights[first].shape[1]
    split = holdout_split(len(xs), cfg.holdout)
    fit = solver.InputStats(k, device=device)
    held = solver.InputStats(k, device=device) if any(split) else None  # k x k sums: only when used
    zeros = 0
    for x, x_original, held_out in zip(xs, xs_original, split):
        x = x.to(device)
        x_hat = apply_threshold(x, t)
        zeros += int((x_hat == 0).sum())
        (held if held_out else fit).add(x if cfg.calibration_inputs == "dense" else x_hat, x_original.to(device))
    both = (fit,) if held is None else (fit, held)
    act_sparsity = zeros / (sum(st.tokens for st in both) * k)
    if not all(torch.isfinite(m).all() for st in both for m in (st.H, st.G)):
        raise CalibrationError(f"model.layers.{layer}.{first}: NaN/inf in its calibration inputs "
                               "(the model's earlier weights or activations overflow)")
    chosen: dict[str, tuple[DuoConfig, float | None, float | None]] = {}
    for name, W in weights.items():
        with named_failures(f"model.layers.{layer}.{name}", device):
            if not torch.isfinite(W).all():
                raise CalibrationError(f"model.layers.{layer}.{name}.weight holds NaN/inf in the input model")
            chosen[name] = (cfg, None, None) if held is None else choose_on_heldout(W, fit, held, cfg)
    stats = fit
    if held is not None and cfg.final_fit == "all":
        stats.add_stats(held)
    del held
    result = GroupResult(threshold=t, weights={}, records=[])
    for name, W in weights.items():
        linear_cfg, heldout_err, heldout_err_sparsegpt = chosen[name]
        with named_failures(f"model.layers.{layer}.{name}", device):
            W_new = prune_weight(W, stats, linear_cfg)
            if not torch.isfinite(W_new).all():
                raise CalibrationError(f"model.layers.{layer}.{name}: pruning gave NaN/inf weights "
                                       f"(ill-conditioned Hessian; try a larger --percdamp than {cfg.percdamp})")
            err = solver.reconstruction_error(W_new, W, stats)
        W_new = W_new.to(W.dtype)
        w_sp = float((W_new == 0).float().mean())
        result.weights[name] = W_new
        duogpt = cfg.method == "duogpt"
        result.records.append(LayerRecord(
            layer=layer, linear=name, numel=W.numel(), weight_sparsity=w_sp, act_sparsity=act_sparsity, threshold=t,
            rel_error=err, heldout_rel_error=heldout_err, heldout_rel_error_sparsegpt=heldout_err_sparsegpt,
            alpha=linear_cfg.alpha if duogpt else None, percdamp=linear_cfg.percdamp if duogpt else None))
        heldout = "" if heldout_err is None else f" held-out {heldout_err:.4g}"
        choice = f" alpha {linear_cfg.alpha:g} damp {linear_cfg.percdamp:g}" if duogpt else ""
        log_line(f"layer {layer:3d} {name:16s} w-sparsity {w_sp:.3f} x-sparsity {act_sparsity:.3f} "
                 f"t {t:.4g} rel-err {err:.4g}{heldout}{choice}")
    return result


@contextmanager
def named_failures(where: str, device: torch.device) -> Iterator[None]:
    """Out of memory inside the block becomes a CalibrationError naming `where` (a block or a linear)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError with this text
        if not (isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)):
            raise
        raise CalibrationError(
            f"{where}: out of memory on {device} ({str(e).splitlines()[0][:200]}); calibrate with fewer "
            "--nsamples or a shorter --seqlen" + (", or --device cpu" if device.type == "cuda" else "")) from None
