"""evaluate.perplexity's per-window scores (NLL, KL to a reference, top-1 agreement) and evaluate.stats."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from duo_vllm.evaluate import perplexity as ppl
from duo_vllm.evaluate import stats


def _tiny_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_scores_match_a_direct_computation():
    model, other = _tiny_llama(0), _tiny_llama(1)
    windows = torch.randint(0, 97, (5, 17), generator=torch.Generator().manual_seed(0))
    ref = ppl.reference(model, windows, batch_size=2, progress=False)
    scores = ppl.score_windows(other, windows, ref, batch_size=2, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        logq = torch.log_softmax(other(windows).logits[:, :-1].float(), -1)
    nll = -logq.gather(-1, windows[:, 1:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(scores.nll.float(), nll, rtol=1e-5, atol=1e-4)
    kl = (logp.exp() * (logp - logq)).sum(-1).sum(1)
    torch.testing.assert_close(scores.kl.float(), kl, rtol=2e-3, atol=2e-3)  # the reference is kept in float16
    assert torch.equal(scores.top1, (logp.argmax(-1) == logq.argmax(-1)).sum(1))
    assert math.isclose(scores.perplexity, math.exp(float(nll.sum()) / nll.numel() / 16), rel_tol=1e-5)
    assert math.isclose(ppl.perplexity(other, windows, progress=False), scores.perplexity, rel_tol=1e-9)
    summary = scores.summary()
    assert 0 <= summary["top1"] <= 1 and summary["kl"] > 0 and len(summary["window_nll"]) == 5
    same = ppl.score_windows(model, windows, ref, progress=False)  # a model against itself
    assert float(same.top1.sum()) == 5 * 16 and float(same.kl.abs().max()) < 5e-3
    with pytest.raises(ValueError, match="reference holds"):
        ppl.score_windows(other, windows[:, :9], ref, progress=False)
    # per dataset, field-major: each dataset's numbers are its own windows' summary
    both = ppl.score_datasets(other, {"a": windows, "b": windows[:3]}, {"a": ref, "b": ppl.reference(
        model, windows[:3], progress=False)})
    assert set(both) == set(summary) and both["perplexity"]["a"] == summary["perplexity"]
    assert both["window_nll"]["b"] == pytest.approx(summary["window_nll"][:3], rel=1e-6)


def test_paired_bootstrap():
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(200, generator=gen)
    a = b + 0.5 + 0.1 * torch.randn(200, generator=gen)  # a − b ≈ 0.5 ± 0.1/√200
    out = stats.paired_bootstrap(a.tolist(), b.tolist())
    assert out["low"] < out["mean"] < out["high"] and out["documents"] == 200
    assert 0.47 < out["low"] and out["high"] < 0.53
    tie = stats.paired_bootstrap(b.tolist(), b.tolist())
    assert tie["low"] == tie["high"] == 0.0
    ratio = stats.perplexity_ratio([3.0, 3.1, 2.9], [2.0, 2.1, 1.9])
    assert math.isclose(ratio["ratio"], math.e) and ratio["low"] <= ratio["ratio"] <= ratio["high"]
    with pytest.raises(ValueError, match="equal 1-D"):
        stats.paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_bootstrap_over_tasks():
    """Strata (tasks): the mean of the tasks' mean differences, each task's documents resampled on their own."""
    gen = torch.Generator().manual_seed(2)
    small = (torch.rand(50, generator=gen) < 0.5).double()
    large = (torch.rand(5000, generator=gen) < 0.5).double()
    a = {"small": (small + 1).tolist(), "large": large.tolist()}  # +1 on every small-task document, 0 on the large
    b = {"small": small.tolist(), "large": large.tolist()}
    out = stats.paired_bootstrap(a, b, resamples=500)
    assert out["mean"] == 0.5 and out["low"] == out["high"] == 0.5  # a constant difference: no spread
    assert out["documents"] == 5050
    with pytest.raises(ValueError, match="same strata"):
        stats.paired_bootstrap(a, {"small": b["small"]})
