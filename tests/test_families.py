"""Qwen2 and Mistral through the whole chain: prepare-model (GGUF and HF directory) → duo-calibrate →
vllm.LLM and duo-serve → equivalence with the offline reference → perplexity and zero-shot.

The models are small and randomly initialised (tests/tiny_models.py); Qwen2's q/k/v biases are drawn
large enough that a lost, pruned or misplaced bias changes every logit.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")

import tiny_models  # noqa: E402
from duo_vllm.calibrate import models  # noqa: E402
from duo_vllm.evaluate import perplexity, zeroshot  # noqa: E402
from duo_vllm.calibrate.api import calibrate  # noqa: E402
from duo_vllm.calibrate.cli import main as duo_calibrate  # noqa: E402
from duo_vllm.format import LINEAR_NAMES, DuoConfig, load_thresholds  # noqa: E402
from test_serve import (  # noqa: E402
    _agreement,
    _assert_loaded_state,
    _derive,
    _exact,
    _prompt_ids,
    _reference_greedy,
    _run_llm,
    _serve,
    _served_greedy,
    AGREEMENT_MARGIN,
)

pytestmark = pytest.mark.slow
LOGPROB_ATOL = 1e-4  # float32, summation order only (zero thresholds: nothing chaotic)


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.fixture(scope="module", params=sorted(tiny_models.FAMILIES))
def family(request, tmp_path_factory) -> dict:
    """One family's user model (as a HF directory), its prepared copy and its W50+X50 duo checkpoint."""
    name = request.param
    work = tmp_path_factory.mktemp(name)
    user_dir = tiny_models.write_hf(name, work / "user-model")
    model_dir = work / "model"
    assert duo_calibrate(["prepare-model", str(user_dir), "--out", str(model_dir)]) == 0
    cfg = DuoConfig(method="duogpt", weight_sparsity=0.5, act_sparsity=0.5, dataset="local:c4", nsamples=8, seqlen=256)
    ckpt = calibrate(model_dir, work / "duo-w50x50", cfg, device="cpu")
    arch = tiny_models.FAMILIES[name][1]
    return {"name": name, "arch": arch, "work": work, "user": user_dir, "model": model_dir, "ckpt": ckpt,
            "layers": tiny_models.SHAPE["num_hidden_layers"]}


@pytest.fixture(scope="module")
def prompts(family) -> list[list[int]]:
    return _prompt_ids(family["model"])


def test_prepare_model_from_hf_directory_and_gguf(family):
    original = _tensors(family["user"])
    assert json.loads((family["model"] / "config.json").read_text())["architectures"] == [family["arch"]]
    prepared = _tensors(family["model"])
    assert prepared.keys() == original.keys()
    assert all(torch.equal(prepared[k], original[k]) for k in original)
    # the same model as a float32 GGUF in llama.cpp's layout (a Mistral GGUF is a llama GGUF there)
    gguf_file = tiny_models.write_gguf(family["name"], family["work"] / "model.gguf")
    from_gguf = family["work"] / "from-gguf"
    assert duo_calibrate(["prepare-model", str(gguf_file), "--out", str(from_gguf)]) == 0
    converted = _tensors(from_gguf)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original), family["name"]
    tok, ref = models.load_tokenizer(from_gguf), models.load_tokenizer(family["user"])
    text = "The capital of France is Paris."
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and tok.eos_token == ref.eos_token


def test_calibration_prunes_weights_and_keeps_biases(family):
    before, after = _tensors(family["model"]), _tensors(family["ckpt"])
    biases = [k for k in before if k.endswith(".bias")]
    assert (len(biases) == 3 * family["layers"]) == (family["name"] == "qwen2")  # Qwen2: q, k, v
    assert all(torch.equal(after[k], before[k]) for k in biases)
    for layer in range(family["layers"]):
        for linear in LINEAR_NAMES:
            w = after[f"model.layers.{layer}.{linear}.weight"]
            assert 0.5 <= float((w == 0).float().mean()) <= 0.5 + 0.1, (layer, linear)
    untouched = [k for k in before if "norm" in k or "embed" in k or "lm_head" in k]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)
    assert len(load_thresholds(family["ckpt"])) == family["layers"] * len(LINEAR_NAMES)  # and checked
    assert json.loads((family["ckpt"] / "config.json").read_text())["architectures"] == [family["arch"]]


@torch.no_grad()
def _reference_logprobs(ckpt, prompts, generations) -> list[list[float]]:
    from duo_vllm.reference import load_reference_model

    model = load_reference_model(ckpt)
    out = []
    for ids, gen in zip(prompts, generations):
        logits = model(torch.tensor([ids + gen[:-1]]), use_cache=False).logits[0, len(ids) - 1:]
        out.append(torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(gen)[:, None])[:, 0].tolist())
    return out


def test_llm_weights_only_equals_the_reference(family, prompts, tmp_path):
    """Pruned weights (and Qwen2's biases) with zero thresholds: tokens and log-probabilities equal."""
    ckpt = _derive(family["ckpt"], tmp_path / "zero-thresholds", threshold=lambda k, v: 0.0)
    result = _run_llm(ckpt, 1, prompts, tmp_path)
    _assert_loaded_state(result, 1, layers=family["layers"])
    reference = _reference_greedy(ckpt, prompts)
    print(f"{family['name']} weights-only LLM vs reference:", _exact(result["tokens"], reference))
    assert result["tokens"] == reference
    expected = _reference_logprobs(ckpt, prompts, result["tokens"])
    worst = max(abs(a - b) for got, exp in zip(result["logprobs"], expected) for a, b in zip(got, exp))
    print(f"{family['name']} weights-only: largest log-probability difference {worst:.2e}")
    assert worst <= LOGPROB_ATOL


def test_duo_serve_agrees_with_the_reference_and_scores(family, prompts, tmp_path):
    ckpt = family["ckpt"]
    with contextmanager(_serve)(ckpt, tmp_path / "server.log") as server:
        served = _served_greedy(server, ckpt, prompts)
        print(f"{family['name']} W50+X50 server vs reference:", _exact(served, _reference_greedy(ckpt, prompts)))
        engine, twin = _agreement(ckpt, prompts, served)
        print(f"{family['name']} W50+X50 server: agreement {engine:.3f} (noisy reference {twin:.3f})")
        assert engine >= twin - AGREEMENT_MARGIN
        tasks = ["arc_easy", "piqa"]
        served_scores = zeroshot.evaluate_zeroshot(ckpt, tasks, limit=8, backend="server",
                                                   base_url=f"{server.base_url}/v1", served_name=str(ckpt))
    reference_scores = zeroshot.evaluate_zeroshot(ckpt, tasks, limit=8, backend="reference", batch_size=4)
    for task in tasks:
        assert served_scores["tasks"][task]["n"] == reference_scores["tasks"][task]["n"] == 8
        # a random model's choices are near ties: one threshold flip may swap one document
        assert abs(served_scores["tasks"][task]["acc"] - reference_scores["tasks"][task]["acc"]) <= 1 / 8, task
    ppl = {path.name: perplexity.evaluate_perplexity(path, "local:wiki", seqlen=256, max_tokens=2048,
                                                   progress=False)["perplexity"]
           for path in (family["model"], ckpt)}
    print(f"{family['name']} perplexity (random weights, vocabulary 49152):", ppl)
    assert all(math.isfinite(v) and 1 < v for v in ppl.values())


@torch.no_grad()
def test_the_mistral_window_is_exercised(smollm2_dir):
    """The equivalence above covers windowed attention: the prompts outgrow the window, and it matters."""
    prompts = _prompt_ids(smollm2_dir)  # the same tokenizer as the tiny models'
    assert min(len(p) for p in prompts) > tiny_models.SLIDING_WINDOW
    model, _ = tiny_models.tiny_model("mistral")
    ids = torch.tensor([prompts[0]])
    windowed = model(ids, use_cache=False).logits
    model.config.sliding_window = None
    assert not torch.allclose(model(ids, use_cache=False).logits[0, -1], windowed[0, -1], atol=1e-3)
