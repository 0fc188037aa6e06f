"""The solver math alone: pure tensors, random and real activations."""
from __future__ import annotations

import pytest
import torch

from duo_vllm.calibrate import solver
from duo_vllm.format import apply_threshold


def objective(W_new, W, x_sparse, x_dense) -> float:
    """‖W'X̂ − WX̃‖² / ‖WX̃‖², computed directly from the activations (tokens × k)."""
    target = x_dense @ W.T
    return float(((x_sparse @ W_new.T - target) ** 2).sum() / (target**2).sum())


def stats_of(x_sparse, x_dense=None, dtype=torch.float64):
    st = solver.InputStats(x_sparse.shape[-1], dtype=dtype, with_residual=x_dense is not None)
    st.add(x_sparse, x_dense)
    return st


def random_layer(n=64, k=192, tokens=2048, p_x=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    x_dense = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    x_dense += 0.2 * torch.randn(tokens, k, generator=g, dtype=torch.float64)
    t = solver.activation_threshold(x_dense, p_x)
    return torch.randn(n, k, generator=g, dtype=torch.float64), apply_threshold(x_dense, t), x_dense


@pytest.fixture(scope="module")
def real_layer(smollm2_dir):
    """Dense input of layer 3's gate/up (post-attention RMSNorm) on real text, and gate_proj's weight."""
    from duo_vllm.calibrate import data, models

    model = models.load_model(smollm2_dir, dtype=torch.float32)
    tok = models.load_tokenizer(smollm2_dir)
    ids = data.calibration_windows(tok, "local:c4", nsamples=4, seqlen=256, seed=1)
    captured = []
    gate = model.model.layers[3].mlp.gate_proj
    handle = gate.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        model.model(ids[:, :], use_cache=False)
    handle.remove()
    x_dense = captured[0].reshape(-1, gate.in_features).double()
    return gate.weight.detach().double().clone(), x_dense


def test_duogpt_without_residual_is_sparsegpt():
    W, x_sparse, _ = random_layer()
    st = stats_of(x_sparse, x_sparse)  # X̃ = X̂: p_x = 0 in effect, G = 0, A = 0
    assert torch.count_nonzero(st.G) == 0
    duo = solver.duogpt_prune(W, st.H, st.G, st.a, 0.5)
    sgpt = solver.sparsegpt_prune(W, st.H, 0.5)
    torch.testing.assert_close(duo, sgpt, rtol=0, atol=0)


@pytest.mark.parametrize("p_w", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_exact_target_sparsity(p_w):
    W, x_sparse, x_dense = random_layer(n=48, k=200)  # 200 = one full and one ragged 72-column block
    st = stats_of(x_sparse, x_dense)
    fns = {
        "duogpt": lambda: solver.duogpt_prune(W, st.H, st.G, st.a, p_w),
        "sparsegpt": lambda: solver.sparsegpt_prune(W, st.H, p_w),
        "wanda": lambda: solver.wanda_prune(W, st.sq_norm, p_w),
        "magnitude": lambda: solver.magnitude_prune(W, p_w),
    }
    for name, fn in fns.items():
        zeros = int((fn() == 0).sum())
        per_block = int(48 * 128 * p_w) + int(48 * 72 * p_w)
        expected = {"duogpt": per_block, "sparsegpt": per_block, "wanda": 48 * int(200 * p_w),
                    "magnitude": int(48 * 200 * p_w)}[name]
        assert zeros == expected, name


def test_reconstruction_error_matches_activations():
    W, x_sparse, x_dense = random_layer()
    st = stats_of(x_sparse, x_dense)
    W_new = solver.duogpt_prune(W, st.H, st.G, st.a, 0.5)
    assert solver.reconstruction_error(W_new, W, st) == pytest.approx(objective(W_new, W, x_sparse, x_dense), rel=1e-9)


def test_objective_ordering_random():
    W, x_sparse, x_dense = random_layer()
    st = stats_of(x_sparse, x_dense)
    duo = objective(solver.duogpt_prune(W, st.H, st.G, st.a, 0.5), W, x_sparse, x_dense)
    sgpt = objective(solver.sparsegpt_prune(W, st.H, 0.5), W, x_sparse, x_dense)
    mag = objective(solver.magnitude_prune(W, 0.5), W, x_sparse, x_dense)
    assert duo < sgpt < mag


def test_objective_ordering_real_activations(real_layer):
    """On SmolLM2's real gate_proj input at W50+X50: DuoGPT < SparseGPT < no update (Wanda mask, magnitude)."""
    W, x_dense = real_layer
    x_sparse = apply_threshold(x_dense, solver.activation_threshold(x_dense, 0.5))
    st = stats_of(x_sparse, x_dense)
    results = {
        "duogpt": objective(solver.duogpt_prune(W, st.H, st.G, st.a, 0.5), W, x_sparse, x_dense),
        "sparsegpt": objective(solver.sparsegpt_prune(W, st.H, 0.5), W, x_sparse, x_dense),
        "wanda": objective(solver.wanda_prune(W, st.sq_norm, 0.5), W, x_sparse, x_dense),
        "magnitude": objective(solver.magnitude_prune(W, 0.5), W, x_sparse, x_dense),
        "unpruned": objective(W, W, x_sparse, x_dense),
    }
    assert results["duogpt"] < results["sparsegpt"] < min(results["wanda"], results["magnitude"]), results
    exact = objective(solver.duogpt_prune(W, st.H, st.G, st.a, 0.5, residual_weights="original"), W, x_sparse, x_dense)
    assert exact < results["duogpt"], (exact, results)
    # The residual term even beats leaving the weights unpruned on the same sparse input at p_w = 0.
    duo_dense = objective(solver.duogpt_prune(W, st.H, st.G, st.a, 0.0), W, x_sparse, x_dense)
    assert duo_dense < results["unpruned"], (duo_dense, results)


def test_dead_channels_and_ill_conditioned_hessian():
    W, x_sparse, x_dense = random_layer(k=128)
    x_sparse[:, :10] = 0  # channels never above threshold: diag H = 0
    x_dense[:, 5] = 0
    st = stats_of(x_sparse, x_dense)
    out = solver.duogpt_prune(W, st.H, st.G, st.a, 0.5)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[:, :10]) == 0
    # rank-deficient H (more channels than independent directions) with no damping: damping is raised
    low_rank = torch.randn(4096, 8, dtype=torch.float64) @ torch.randn(8, 128, dtype=torch.float64)
    st = stats_of(low_rank, low_rank)
    out = solver.duogpt_prune(W, st.H, st.G, st.a, 0.5, percdamp=0.0)
    assert torch.isfinite(out).all() and int((out == 0).sum()) == W.numel() // 2


def test_not_positive_definite_raises_damping(caplog):
    B = torch.randn(16, 4, dtype=torch.float64)
    H = B @ B.T
    H -= 0.05 * torch.diag(H).mean() * torch.eye(16, dtype=torch.float64)  # indefinite, as rounding can make it
    with caplog.at_level("WARNING", logger="duo.calibrate.solver"):
        U, damp = solver.inverse_hessian_factor(H, 0.01)
    assert damp == pytest.approx(0.1) and torch.isfinite(U).all()
    assert "not positive definite" in caplog.text


def test_activation_threshold_fraction():
    x = torch.randn(10000, dtype=torch.float64)
    for p in (0.0, 0.3, 0.5, 0.9):
        t = solver.activation_threshold(x, p)
        assert float((apply_threshold(x, t) == 0).double().mean()) == pytest.approx(p, abs=1e-4)
        if p:  # the order statistic torch.kthvalue gives
            kth = int(round(p * x.numel()))
            assert t == float(torch.kthvalue(x.abs().float(), kth).values)


def test_candidates_stacked_equal_one_solve_each():
    """prune_candidates runs several alphas (SparseGPT at 0) in one column loop: each equals its own solve."""
    W, x_sparse, x_dense = random_layer(k=160)  # two lazy blocks, the second partial
    st = stats_of(x_sparse, x_dense)
    stacked = solver.prune_candidates(W, st.H, st.G, st.a, 0.5, [0.0, 0.25, 1.0], blocksize=128)
    alone = [solver.sparsegpt_prune(W, st.H, 0.5), solver.duogpt_prune(W, st.H, st.G, st.a, 0.5, alpha=0.25),
             solver.duogpt_prune(W, st.H, st.G, st.a, 0.5, alpha=1.0)]
    for got, want in zip(stacked, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got == 0).float().mean() == 0.5
    assert not torch.equal(stacked[0], stacked[2])
    with pytest.raises(ValueError, match="needs the cross statistics"):
        solver.prune_candidates(W, st.H, None, None, 0.5, [0.5])
