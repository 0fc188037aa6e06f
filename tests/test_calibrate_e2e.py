"""duo-calibrate end to end on the real SmolLM2-135M-Instruct with a small calibration set."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from duo_vllm.calibrate import data, models
from duo_vllm.evaluate.perplexity import load_for_eval, perplexity
from duo_vllm.format import LINEAR_NAMES, load_thresholds, read_config, read_report

pytestmark = pytest.mark.slow
EVAL_SEQLEN = 512
EVAL_TOKENS = 8192


def weight_zero_fraction(ckpt) -> float:
    zeros = total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name.endswith(".weight") and any(f".{lin}." in name for lin in LINEAR_NAMES):
                    w = sf.get_tensor(name)
                    zeros += int((w == 0).sum())
                    total += w.numel()
    return zeros / total


def test_checkpoint_format_and_sparsity(duo_checkpoint, smollm2_dir):
    ckpt = duo_checkpoint("duogpt", 0.5, 0.5)
    cfg = read_config(ckpt)
    assert (cfg.method, cfg.weight_sparsity, cfg.act_sparsity) == ("duogpt", 0.5, 0.5)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "duo"
    assert raw["architectures"] == ["LlamaForCausalLM"]
    for name in ("tokenizer.json", "generation_config.json", "duo_report.json"):
        assert (ckpt / name).is_file(), name

    report = read_report(ckpt)
    # exact per block, plus the weights of input channels never active in calibration (zeroed)
    assert 0.5 <= report.summary.weight_sparsity <= 0.5 + 1e-3
    assert report.summary.act_sparsity == pytest.approx(0.5, abs=0.01)
    assert len(report.layers) == 30 * len(LINEAR_NAMES)
    assert all(0 <= r.rel_error < 1 for r in report.layers)
    assert report.calibration_data.shape == [8, 256] and len(report.calibration_data.fingerprint) == 16
    assert report.config == cfg
    # what the report says is in the file
    assert weight_zero_fraction(ckpt) == pytest.approx(report.summary.weight_sparsity, abs=1e-9)

    thresholds = load_thresholds(ckpt)
    assert len(thresholds) == 30 * len(LINEAR_NAMES)  # load_thresholds checked them against config.json
    assert all(t > 0 for t in thresholds.values())


def test_loads_in_plain_transformers(duo_checkpoint):
    """The checkpoint is an ordinary LLaMA directory: transformers loads it without the plugin."""
    from transformers import AutoModelForCausalLM

    ckpt = duo_checkpoint("duogpt", 0.5, 0.5)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    w = model.model.layers[7].mlp.down_proj.weight
    assert 0.5 <= float((w == 0).float().mean()) <= 0.501
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()


def test_thresholds_only_checkpoint_keeps_weights(duo_checkpoint, smollm2_dir):
    ckpt = duo_checkpoint("teal", 0.0, 0.5)
    dense = models.load_model(smollm2_dir)
    tuned = models.load_model(ckpt)
    for (name, a), b in zip(dense.named_parameters(), tuned.parameters()):
        assert torch.equal(a, b), name
    assert read_report(ckpt).summary.act_sparsity == pytest.approx(0.5, abs=0.01)


@pytest.fixture(scope="module")
def perplexities(duo_checkpoint, smollm2_dir):
    tok = models.load_tokenizer(smollm2_dir)
    windows = data.evaluation_windows(tok, "local:wiki", EVAL_SEQLEN, EVAL_TOKENS)
    result = {"dense": perplexity(models.load_model(smollm2_dir, torch.float32), windows, progress=False)}
    for method in ("duogpt", "sparsegpt", "magnitude"):
        model = load_for_eval(duo_checkpoint(method, 0.5, 0.5))
        result[method] = perplexity(model, windows, progress=False)
    print("held-out perplexity at W50+X50:", result)
    return result


def test_perplexity_ordering(perplexities):
    p = perplexities
    assert p["dense"] < p["duogpt"] < p["magnitude"], p
    assert p["duogpt"] <= p["sparsegpt"], p


def test_paper_style_baseline_fits_on_the_dense_stream(tmp_path):
    """--calibration-inputs dense: no threshold enters calibration, so SparseGPT's weights at W50+X50 are those of
    W50+X0 (whose thresholds are 0) bit for bit, while the thresholds are still calibrated."""
    from safetensors.torch import load_file

    import tiny_models
    from duo_vllm.calibrate.api import calibrate
    from duo_vllm.format import DuoConfig

    user = tiny_models.write_hf("qwen2", tmp_path / "user")
    kw = dict(method="sparsegpt", weight_sparsity=0.5, nsamples=2, seqlen=64)
    dense = calibrate(user, tmp_path / "dense", DuoConfig(**kw, act_sparsity=0.5, calibration_inputs="dense"),
                      device="cpu")
    plain = calibrate(user, tmp_path / "plain", DuoConfig(**kw, act_sparsity=0.0), device="cpu")
    served = calibrate(user, tmp_path / "served", DuoConfig(**kw, act_sparsity=0.5), device="cpu")
    weights = {name: load_file(next(path.glob("*.safetensors"))) for name, path in
               (("dense", dense), ("plain", plain), ("served", served))}
    for tensor, w in weights["dense"].items():
        assert torch.equal(w, weights["plain"][tensor]), tensor
    assert any(not torch.equal(w, weights["served"][t]) for t, w in weights["dense"].items() if t.endswith("proj.weight"))
    t_dense, t_served = load_thresholds(dense), load_thresholds(served)
    assert all(t > 0 for t in t_dense.values())
    assert t_dense[(0, "self_attn.q_proj")] == t_served[(0, "self_attn.q_proj")]  # the same first input


def test_compressed_residual_target_corrects_only_the_threshold_error(tmp_path):
    """--residual-target compressed: the residual is X_c − X̂ (the entries the threshold zeroes), so at X0 DuoGPT is
    SparseGPT bit for bit, and at X50 it differs from the original-target DuoGPT."""
    from safetensors.torch import load_file

    import tiny_models
    from duo_vllm.calibrate.api import calibrate
    from duo_vllm.format import DuoConfig

    user = tiny_models.write_hf("qwen2", tmp_path / "user")
    kw = dict(weight_sparsity=0.5, nsamples=2, seqlen=64)

    def weights(name: str, **fields) -> dict[str, torch.Tensor]:
        out = calibrate(user, tmp_path / name, DuoConfig(**kw, **fields), device="cpu")
        return load_file(next(out.glob("*.safetensors")))

    local = weights("local-x0", method="duogpt", alpha=1.0, act_sparsity=0.0, residual_target="compressed")
    sparsegpt = weights("sparsegpt-x0", method="sparsegpt", act_sparsity=0.0)
    assert all(torch.equal(w, sparsegpt[t]) for t, w in local.items())
    local = weights("local-x50", method="duogpt", alpha=1.0, act_sparsity=0.5, residual_target="compressed")
    original = weights("original-x50", method="duogpt", alpha=1.0, act_sparsity=0.5)
    sparsegpt = weights("sparsegpt-x50", method="sparsegpt", act_sparsity=0.5)
    # block 0's q/k/v see the model's first input, the same in both streams: the two targets agree there
    first = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    projections = [t for t in local if t.endswith("proj.weight") and t not in first]
    assert all(not torch.equal(local[t], original[t]) for t in projections)
    assert all(torch.equal(local[t], original[t]) for t in first)
    assert all(not torch.equal(local[t], sparsegpt[t]) for t in projections + first)
