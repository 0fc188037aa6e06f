"""calibrate.group: the held-out split, and DuoGPT's choice of α and damping per linear on it."""
from __future__ import annotations

import torch

from duo_vllm.calibrate import group, solver
from duo_vllm.calibrate.methods import prune_weight
from duo_vllm.format import DuoConfig, apply_threshold


def _layer(n=48, k=96, samples=8, tokens=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5  # correlated channels, as real activations are
    xs = [torch.randn(tokens, k, generator=gen) @ mix for _ in range(samples)]
    return torch.randn(n, k, generator=gen), xs


def test_holdout_split():
    assert [i for i, held in enumerate(group.holdout_split(16, 0.25)) if held] == [3, 7, 11, 15]
    assert not any(group.holdout_split(16, 0.0))
    assert not any(group.holdout_split(2, 0.25))  # too few sequences: nothing held out


def test_choice_is_the_best_candidate_on_the_held_out_tokens():
    W, xs = _layer()
    t = solver.activation_threshold(torch.cat(xs), 0.5)
    fit, held = solver.InputStats(W.shape[1]), solver.InputStats(W.shape[1])
    for i, x in enumerate(xs):
        (held if i % 4 == 3 else fit).add(apply_threshold(x, t), x)
    cfg = DuoConfig(holdout=0.25)
    chosen, err, err_sparsegpt = group.choose_on_heldout(W, fit, held, cfg)
    candidates = [(a, cfg.percdamp) for a in group.ALPHAS] + [(a, cfg.percdamp * group.DAMP_FACTOR)
                                                              for a in group.DAMPED_ALPHAS]
    assert (chosen.alpha, chosen.percdamp) in candidates
    errors = {}
    for alpha, damp in candidates:
        W_fit = solver.duogpt_prune(W, fit.H, fit.G, fit.a, 0.5, percdamp=damp, alpha=alpha)
        errors[(alpha, damp)] = solver.reconstruction_error(W_fit, W, held)
    assert abs(err - min(errors.values())) <= 1e-4 * err
    assert abs(err_sparsegpt - errors[(0.0, cfg.percdamp)]) <= 1e-4 * err_sparsegpt
    assert err <= err_sparsegpt
    baseline, err_baseline, none = group.choose_on_heldout(W, fit, held, DuoConfig(method="sparsegpt"))
    assert baseline.method == "sparsegpt" and none is None and err_baseline > 0


def test_group_records_report_heldout_errors_and_the_choice():
    W, xs = _layer()
    lines = []
    result = group.calibrate_group({"mlp.down_proj": W}, xs, xs, DuoConfig(holdout=0.25),
                                   torch.Generator().manual_seed(0), 3, torch.device("cpu"), lines.append)
    (rec,) = result.records
    assert rec.heldout_rel_error is not None and rec.heldout_rel_error <= rec.heldout_rel_error_sparsegpt
    assert rec.alpha in group.ALPHAS + group.DAMPED_ALPHAS and rec.percdamp is not None
    assert "held-out" in lines[0] and f"alpha {rec.alpha:g}" in lines[0]
    assert float((result.weights["mlp.down_proj"] == 0).float().mean()) == 0.5
    fixed = group.calibrate_group({"mlp.down_proj": W}, xs, xs, DuoConfig(holdout=0.0), torch.Generator().manual_seed(0),
                                  3, torch.device("cpu"), lines.append)
    assert fixed.records[0].heldout_rel_error is None and fixed.records[0].alpha == DuoConfig().alpha


def test_final_fit_on_the_kept_split_leaves_the_held_out_tokens_out():
    W, xs = _layer()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cfg = DuoConfig(holdout=0.25, final_fit="kept")
    result = group.calibrate_group({"mlp.down_proj": W}, xs, xs, cfg, gen(), 3, torch.device("cpu"), lambda _: None)
    (rec,) = result.records
    t = group.sampled_quantile_threshold(xs, cfg.act_sparsity, gen())
    kept = solver.InputStats(W.shape[1])
    for x, held_out in zip(xs, group.holdout_split(len(xs), cfg.holdout)):
        if not held_out:
            kept.add(apply_threshold(x, t), x)
    expected = prune_weight(W, kept, cfg.model_copy(update={"alpha": rec.alpha, "percdamp": rec.percdamp}))
    torch.testing.assert_close(result.weights["mlp.down_proj"], expected, rtol=0, atol=0)
    everything = group.calibrate_group({"mlp.down_proj": W}, xs, xs, DuoConfig(holdout=0.25), gen(), 3,
                                       torch.device("cpu"), lambda _: None)
    assert everything.records[0].alpha == rec.alpha  # same choice, different final fit
    assert not torch.equal(everything.weights["mlp.down_proj"], result.weights["mlp.down_proj"])


def test_dense_calibration_inputs_fit_on_the_unthresholded_inputs():
    W, xs = _layer()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cfg = DuoConfig(method="sparsegpt", calibration_inputs="dense")
    result = group.calibrate_group({"mlp.down_proj": W}, xs, xs, cfg, gen(), 3, torch.device("cpu"), lambda _: None)
    stats = solver.InputStats(W.shape[1])
    for x in xs:
        stats.add(x, x)
    torch.testing.assert_close(result.weights["mlp.down_proj"], prune_weight(W, stats, cfg), rtol=0, atol=0)
    served = group.calibrate_group({"mlp.down_proj": W}, xs, xs, DuoConfig(method="sparsegpt"), gen(), 3,
                                   torch.device("cpu"), lambda _: None)
    # the same threshold and the same activation sparsity are recorded; only the fit differs
    assert result.threshold == served.threshold > 0
    assert result.records[0].act_sparsity == served.records[0].act_sparsity
    assert not torch.equal(result.weights["mlp.down_proj"], served.weights["mlp.down_proj"])
