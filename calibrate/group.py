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


def calibrate_group(weights: dict[str, torch.Tensor], xs: list[torch.Tensor], xs_original: list[torch.Tensor],
                    cfg: DuoConfig, gen: torch.Generator, layer: int, device: torch.device,
                    log_line: Callable[[str], None]) -> GroupResult:
    """Threshold, statistics and pruned weights for the linears `weights` (name -> weight, on `device`) of
    decoder block `layer`, whose input is xs (compressed stream) / xs_original (original stream) per sample."""
    first = next(iter(weights))
    t = sampled_quantile_threshold(xs, cfg.act_sparsity, gen)
    k = weights[first].shape[1]
    stats = solver.InputStats(k, device=device)
    zeros = 0
    for x, x_original in zip(xs, xs_original):
        x_hat = apply_threshold(x.to(device), t)
        zeros += int((x_hat == 0).sum())
        stats.add(x_hat, x_original.to(device))
    act_sparsity = zeros / (stats.tokens * k)
    if not (torch.isfinite(stats.H).all() and (stats.G is None or torch.isfinite(stats.G).all())):
        raise CalibrationError(f"model.layers.{layer}.{first}: NaN/inf in its calibration inputs "
                               "(the model's earlier weights or activations overflow)")
    result = GroupResult(threshold=t, weights={}, records=[])
    for name, W in weights.items():
        with named_failures(f"model.layers.{layer}.{name}", device):
            if not torch.isfinite(W).all():
                raise CalibrationError(f"model.layers.{layer}.{name}.weight holds NaN/inf in the input model")
            W_new = prune_weight(W, stats, cfg)
            if not torch.isfinite(W_new).all():
                raise CalibrationError(f"model.layers.{layer}.{name}: pruning gave NaN/inf weights "
                                       f"(ill-conditioned Hessian; try a larger --percdamp than {cfg.percdamp})")
            err = solver.reconstruction_error(W_new, W, stats)
        W_new = W_new.to(W.dtype)
        w_sp = float((W_new == 0).float().mean())
        result.weights[name] = W_new
        result.records.append(LayerRecord(layer=layer, linear=name, numel=W.numel(), weight_sparsity=w_sp,
                                          act_sparsity=act_sparsity, threshold=t, rel_error=err))
        log_line(f"layer {layer:3d} {name:16s} w-sparsity {w_sp:.3f} x-sparsity {act_sparsity:.3f} "
                 f"t {t:.4g} rel-err {err:.4g}")
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
