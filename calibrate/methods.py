"""The pruning methods of duo-calibrate, by the names in ``duo_vllm.format.Method``.

Each one maps a linear's weight and the statistics of its input (shared by the linears of a group) to the
weight it writes; the math is in calibrate.solver.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch

from duo_vllm.calibrate import solver
from duo_vllm.format import DuoConfig, Method

Prune = Callable[[torch.Tensor, solver.InputStats, DuoConfig], torch.Tensor]


def _duogpt(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    # even at p_w = 0 it changes the weights: it compensates the activation-sparsity residual
    return solver.duogpt_prune(W, stats.H, stats.G, stats.a, cfg.weight_sparsity, blocksize=cfg.blocksize,
                               percdamp=cfg.percdamp, alpha=cfg.alpha, residual_weights=cfg.residual_weights,
                               mask_score=cfg.mask_score)


def _sparsegpt(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    return solver.sparsegpt_prune(W, stats.H, cfg.weight_sparsity, blocksize=cfg.blocksize, percdamp=cfg.percdamp)


def _wanda(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    return solver.wanda_prune(W, stats.sq_norm, cfg.weight_sparsity)


def _magnitude(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    return solver.magnitude_prune(W, cfg.weight_sparsity)


def _teal(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    return W


METHODS: dict[str, Prune] = {"duogpt": _duogpt, "sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude,
                             "teal": _teal}
assert set(METHODS) == set(get_args(Method)), "every method the format names has one implementation here"


def prune_weight(W: torch.Tensor, stats: solver.InputStats, cfg: DuoConfig) -> torch.Tensor:
    """The configured method applied to one linear's weight; a baseline at p_w = 0 keeps it as it is."""
    if cfg.weight_sparsity == 0 and cfg.method != "duogpt":
        return W
    return METHODS[cfg.method](W, stats, cfg)
