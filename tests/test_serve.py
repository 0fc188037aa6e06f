"""Serving duo checkpoints end to end on CPU: duo-serve, duo-chat, vllm.LLM, tensor parallelism, reliability.

Every server starts once per test class on a free loopback port and is stopped afterwards (float32,
eager, 1 GiB KV cache). Checkpoints come from the session-scoped `duo_checkpoint` fixture (conftest.py),
which runs duo-calibrate's pipeline once per session and shares the result with the calibrator tests.

Equivalence, and why two criteria: with real thresholds the dual-sparse model is numerically chaotic.
A last-bit difference (vLLM's CPU attention kernel vs torch SDPA, or a 1-row decode GEMM vs the
reference's full-sequence GEMM) moves one activation across its threshold; that flip perturbs the next
layers by ~1e-3, which flips hundreds of activations there, and so on. The offline reference disagrees
with itself in the same way when only its attention kernel changes (SDPA vs eager). So:
  * exact greedy-token equality is asserted where the arithmetic is not chaotic: the calibrated W50
    weights with zero thresholds (server, vllm.LLM, and TP=3 vs TP=1);
  * the loaded engine is checked tensor by tensor against the checkpoint (every rank, TP=1 and TP=3);
  * with real thresholds, the served greedy tokens, teacher-forced through the reference, must agree with
    the reference's argmax at least as often (minus a small margin) as the reference itself does when a
    few float32 ulps of noise (1e-6 relative) enter before each thresholded linear. Exact matches are
    printed. (Measured here: vLLM agrees about as well as 1e-6 noise, less well than 1e-7 noise or the
    eager-attention twin, as vLLM's kernels differ from torch's in several places per layer.)
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")

from duo_vllm.format import parse_threshold_name  # noqa: E402
from duo_vllm.reference import load_reference_model  # noqa: E402
from duo_vllm.serve.server import ServerProcess, console_script, free_port  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning Python.",
]
NEW_TOKENS = 24
MAX_MODEL_LEN = 1024
API_KEY = "duo-test-key"
# Relative noise (~8 float32 ulps) that the reference's noisy twin gets before every thresholded linear,
# and how much less often than that twin the engine may agree with the reference.
NOISE = 1e-6
AGREEMENT_MARGIN = 0.05
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
# 2 cores, one NUMA node: TP ranks share cores without binding
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


# --- helpers ------------------------------------------------------------------------------------



@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation without a KV cache: each step recomputes the full sequence, like the calibrated model saw it."""
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, use_cache=False).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out

def _script(name: str) -> list[str]:
    return console_script(name, {"duo-serve": "duo_vllm.serve.launch", "duo-chat": "duo_vllm.serve.chat"}[name])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **SERVER_ENV, **extra}


def _serve(ckpt: Path, log: Path, *args: str):
    server = ServerProcess([*_script("duo-serve"), str(ckpt), "--max-model-len", str(MAX_MODEL_LEN), *args], log,
                           _env())
    try:
        server.wait_ready(400)
        yield server
    finally:
        server.stop()


def _prompt_ids(ckpt: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    out = []
    for p in PROMPTS:
        enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


def _served_greedy(server: ServerProcess, ckpt: Path, prompts: list[list[int]], **client_kw) -> list[list[int]]:
    """Greedy token ids through the completions API (prompt given as token ids, EOS ignored)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=client_kw.get("api_key", "EMPTY"))
    out = []
    for ids in prompts:
        r = client.completions.create(
            model=str(ckpt), prompt=ids, max_tokens=NEW_TOKENS, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        out.append(list(r.choices[0].token_ids))
    return out


def _reference_greedy(ckpt: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load_reference_model(ckpt)
    return [greedy_generate(model, ids, NEW_TOKENS) for ids in prompts]


@torch.no_grad()
def _agreement(ckpt: Path, prompts: list[list[int]], generations: list[list[int]]) -> tuple[float, float]:
    """Teacher-forced on `generations`: how often the reference's argmax equals (the engine's token, the
    argmax of the reference itself under NOISE relative noise before every thresholded linear)."""
    reference = load_reference_model(ckpt)
    noisy = load_reference_model(ckpt)
    gen = torch.Generator().manual_seed(0)

    def noise(x: torch.Tensor) -> torch.Tensor:
        return x * (1 + NOISE * torch.randn(x.shape, generator=gen))

    for layer in noisy.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.register_forward_hook(lambda m, args, out: noise(out))
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):  # before the threshold hook
            linear.register_forward_pre_hook(lambda m, args: (noise(args[0]),), prepend=True)
    engine = twin = total = 0
    for ids, gen_ids in zip(prompts, generations):
        x = torch.tensor([ids + gen_ids[:-1]])
        ref = reference(x, use_cache=False).logits[0, len(ids) - 1:].argmax(-1)
        twin += int((ref == noisy(x, use_cache=False).logits[0, len(ids) - 1:].argmax(-1)).sum())
        engine += int((ref == torch.tensor(gen_ids)).sum())
        total += len(gen_ids)
    return engine / total, twin / total


def _exact(a: list[list[int]], b: list[list[int]]) -> str:
    first = [next((j for j, (x, y) in enumerate(zip(s, t)) if x != y), None) for s, t in zip(a, b)]
    return f"{sum(f is None for f in first)}/{len(first)} prompts identical, first divergence per prompt {first}"


def _derive(src: Path, dst: Path, threshold=None, config=None) -> Path:
    """A checkpoint beside src: files symlinked, thresholds mapped by threshold(name, value) -> value | None
    (None drops the tensor), quantization_config edited by config(dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name == "config.json" and config:
            raw = json.loads(f.read_text())
            config(raw["quantization_config"])
            (dst / f.name).write_text(json.dumps(raw, indent=2))
            continue
        if f.suffix == ".safetensors" and threshold:
            with safe_open(str(f), framework="pt") as sf:
                if any(parse_threshold_name(k) for k in sf.keys()):
                    tensors = {}
                    for k in sf.keys():
                        t = sf.get_tensor(k)
                        if parse_threshold_name(k):
                            v = threshold(k, float(t))
                            if v is None:
                                continue
                            t = torch.tensor(v, dtype=torch.float32)
                        tensors[k] = t
                    save_file(tensors, str(dst / f.name))
                    continue
        (dst / f.name).symlink_to(f.resolve())
    return dst


# A module run in a fresh process (vLLM's CPU workers bind threads and spawn processes: keep that out
# of pytest): greedy-decodes the prompts and checks every rank's loaded tensors against the files.
# It is imported by name, so that its function pickles by reference to vLLM's workers.
LLM_MODULE = "duo_llm_run"
LLM_SOURCE = r'''
import json, sys
from functools import partial


def loaded_state(ckpt, model):
    """On each worker: compare every decoder linear's runtime weight shard and threshold with the checkpoint."""
    from pathlib import Path
    import torch
    from safetensors import safe_open
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from duo_vllm.format import LINEAR_GROUPS, load_thresholds
    from duo_vllm.kernels import cpu_kernel
    from duo_vllm.quant import DuoLinearMethod

    rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    files = {}
    for f in Path(ckpt).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            files.update({k: f for k in sf.keys()})
    thresholds = load_thresholds(ckpt)
    modules = {"self_attn.qkv_proj": ("qkv", 0), "self_attn.o_proj": ("o", 1),
               "mlp.gate_up_proj": ("gate_up", 0), "mlp.down_proj": ("down", 1)}  # split dim of the TP shard
    problems, checked, kernels = [], 0, set()
    for i, layer in enumerate(model.model.layers):
        for module, (group, dim) in modules.items():
            mod = layer.get_submodule(module)
            if not isinstance(mod.quant_method, DuoLinearMethod):
                problems.append(f"layer {i} {module}: {type(mod.quant_method).__name__}")
                continue
            parts = []
            for name in LINEAR_GROUPS[group]:
                key = f"model.layers.{i}.{name}.weight"
                with safe_open(str(files[key]), framework="pt") as sf:
                    w = sf.get_tensor(key)
                size = w.shape[dim] // world
                parts.append(w.narrow(dim, rank * size, size))
            kernels.add(mod.quant_method.kernel.name)
            # the CPU kernel's runtime layout, built from this rank's shard of the checkpoint, tensor by tensor
            runtime, expected = mod.quant_method.kernel.packed, cpu_kernel.pack(torch.cat(parts, 0))
            # bit for bit: the blob holds mask words, some of which spell NaN as floats
            if not (torch.equal(runtime.blob.view(torch.int32), expected.blob.view(torch.int32))
                    and torch.equal(runtime.offsets, expected.offsets)):
                problems.append(f"layer {i} {module}: weight differs from the checkpoint on rank {rank}")
            t = torch.tensor(thresholds[(i, LINEAR_GROUPS[group][0])], dtype=torch.float32)
            if not torch.equal(mod.input_threshold.data.float(), t):
                problems.append(f"layer {i} {module}: threshold {float(mod.input_threshold)} != {float(t)}")
            checked += 1
    return {"rank": rank, "checked": checked, "problems": problems[:10], "kernels": sorted(kernels),
            "embed": type(model.model.embed_tokens.quant_method).__name__,
            "lm_head": type(model.lm_head.quant_method).__name__}


def main():
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    llm = LLM(model=args["ckpt"], quantization="duo", dtype="float32", enforce_eager=True,
              max_model_len=args["max_model_len"], tensor_parallel_size=args["tp"])
    outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]],
                        SamplingParams(temperature=0, max_tokens=args["new_tokens"], ignore_eos=True, logprobs=0))
    ranks = llm.apply_model(partial(loaded_state, args["ckpt"]))
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "ranks": ranks,
              "logprobs": [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                           for o in outs]}
    with open(args["out"], "w") as f:
        json.dump(result, f)
'''


def _run_llm(ckpt: Path, tp: int, prompts: list[list[int]], workdir: Path) -> dict:
    out = workdir / f"llm-{ckpt.name}-tp{tp}.json"
    (workdir / f"{LLM_MODULE}.py").write_text(LLM_SOURCE)
    args = {"ckpt": str(ckpt), "tp": tp, "prompts": prompts, "new_tokens": NEW_TOKENS,
            "max_model_len": MAX_MODEL_LEN, "out": str(out)}
    # apply_model ships a function to the workers: allow vLLM's pickle fallback in this test process
    env = _env(VLLM_ALLOW_INSECURE_SERIALIZATION="1", PYTHONPATH=str(workdir), **(TP_ENV if tp > 1 else {}))
    proc = subprocess.run([sys.executable, "-c", f"import {LLM_MODULE}; {LLM_MODULE}.main()", json.dumps(args)],
                          env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _assert_loaded_state(result: dict, tp: int, layers: int = 30) -> None:
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(tp))
    for r in ranks:
        assert r["problems"] == [] and r["checked"] == layers * 4, r
        assert r["kernels"] == ["cpu"], r  # every decoder linear served by the CPU dual-sparse kernel
        assert (r["embed"], r["lm_head"]) == ("UnquantizedEmbeddingMethod",) * 2, r


# --- checkpoints and references (session) ---------------------------------------------------------


@pytest.fixture(scope="session")
def w50x50(duo_checkpoint) -> Path:
    return duo_checkpoint("duogpt", 0.5, 0.5)


@pytest.fixture(scope="session")
def thresholds_only(duo_checkpoint) -> Path:
    return duo_checkpoint("teal", 0.0, 0.5)


@pytest.fixture(scope="session")
def weights_only(w50x50, tmp_path_factory) -> Path:
    """The calibrated W50+X50 checkpoint with every threshold set to 0: pruned weights, dense activations."""
    return _derive(w50x50, tmp_path_factory.mktemp("derived") / "w50-zero-thresholds", threshold=lambda k, v: 0.0)


@pytest.fixture(scope="session")
def prompt_ids(smollm2_dir) -> list[list[int]]:
    return _prompt_ids(smollm2_dir)


@pytest.fixture(scope="session")
def weights_only_reference(weights_only, prompt_ids) -> list[list[int]]:
    return _reference_greedy(weights_only, prompt_ids)


@pytest.fixture(scope="session")
def llm_runs(tmp_path_factory, prompt_ids):
    """run(ckpt, tp) -> vllm.LLM result, computed once per (checkpoint, tp)."""
    done: dict[tuple, dict] = {}
    workdir = tmp_path_factory.mktemp("llm")

    def run(ckpt: Path, tp: int) -> dict:
        if (ckpt, tp) not in done:
            done[(ckpt, tp)] = _run_llm(ckpt, tp, prompt_ids, workdir)
        return done[(ckpt, tp)]

    return run


# --- checkpoint checks before anything starts ---------------------------------------------------


def _duo_serve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*_script("duo-serve"), *args, "--port", str(free_port())], env=_env(),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def test_duo_serve_checks_the_checkpoint_first(smollm2_dir, w50x50, tmp_path):
    t0 = time.time()
    proc = _duo_serve(str(tmp_path / "nope"))
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    proc = _duo_serve(str(smollm2_dir))
    assert proc.returncode == 2 and "quant_method" in proc.stderr and "duo-calibrate" in proc.stderr
    missing = _derive(w50x50, tmp_path / "missing",
                      threshold=lambda k, v: None if k == "model.layers.5.self_attn.k_proj.input_threshold" else v)
    proc = _duo_serve(str(missing))
    assert proc.returncode == 2 and "model.layers.5.self_attn.k_proj.input_threshold" in proc.stderr, proc.stderr
    assert time.time() - t0 < 60  # refused without loading vLLM's engine


def test_load_errors_stop_the_server_before_it_listens(smollm2_dir, thresholds_only, tmp_path):
    # plain `vllm serve --quantization duo` (through the CPU wrapper) on a checkpoint without duo config
    proc = subprocess.run(
        [sys.executable, "-m", "duo_vllm.serve.vllm_cli", "serve", str(smollm2_dir), "--quantization", "duo",
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--port", str(free_port())],
        env=_env(), capture_output=True, text=True, timeout=600, start_new_session=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "not a duo checkpoint" in out, out[-3000:]
    assert "Application startup complete" not in out
    # weights that contradict the config: only the plugin can see this, after loading
    liar = _derive(thresholds_only, tmp_path / "liar",
                   config=lambda qc: qc.update(method="magnitude", weight_sparsity=0.5))
    proc = _duo_serve(str(liar), "--max-model-len", "256")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\.weight is 0\.\d% zeros", out), out[-3000:]
    assert "Application startup complete" not in out


# --- exact equivalence where the arithmetic allows it ------------------------------------------


class TestWeightsOnlyServer:
    @pytest.fixture(scope="class")
    def server(self, weights_only, tmp_path_factory):
        yield from _serve(weights_only, tmp_path_factory.mktemp("srv") / "weights_only.log")

    def test_greedy_tokens_equal_the_reference(self, server, weights_only, prompt_ids, weights_only_reference):
        served = _served_greedy(server, weights_only, prompt_ids)
        print("weights-only server vs reference:", _exact(served, weights_only_reference))
        assert served == weights_only_reference


def test_llm_and_tensor_parallel_weights_only_exact(llm_runs, weights_only, weights_only_reference):
    tp1, tp3 = llm_runs(weights_only, 1), llm_runs(weights_only, 3)
    _assert_loaded_state(tp1, 1)
    _assert_loaded_state(tp3, 3)
    print("weights-only LLM TP=1 vs reference:", _exact(tp1["tokens"], weights_only_reference))
    print("weights-only LLM TP=3 vs TP=1:", _exact(tp3["tokens"], tp1["tokens"]))
    assert tp1["tokens"] == weights_only_reference
    assert tp3["tokens"] == tp1["tokens"]


# --- real thresholds ----------------------------------------------------------------------------


def _check_agreement(label: str, ckpt: Path, prompts, generations) -> None:
    engine, twin = _agreement(ckpt, prompts, generations)
    print(f"{label}: teacher-forced agreement with the reference {engine:.3f} (noisy reference {twin:.3f})")
    assert engine >= twin - AGREEMENT_MARGIN, (engine, twin)


def test_llm_in_process_and_tensor_parallel_w50x50(llm_runs, w50x50, prompt_ids):
    tp1, tp3 = llm_runs(w50x50, 1), llm_runs(w50x50, 3)
    _assert_loaded_state(tp1, 1)
    _assert_loaded_state(tp3, 3)
    print("W50+X50 LLM TP=3 vs TP=1:", _exact(tp3["tokens"], tp1["tokens"]))
    _check_agreement("W50+X50 LLM TP=1", w50x50, prompt_ids, tp1["tokens"])
    _check_agreement("W50+X50 LLM TP=3", w50x50, prompt_ids, tp3["tokens"])


class TestThresholdsOnlyServer:
    @pytest.fixture(scope="class")
    def server(self, thresholds_only, tmp_path_factory):
        yield from _serve(thresholds_only, tmp_path_factory.mktemp("srv") / "thresholds_only.log")

    def test_greedy_tokens_agree_with_the_reference(self, server, thresholds_only, prompt_ids):
        served = _served_greedy(server, thresholds_only, prompt_ids)
        print("thresholds-only server vs reference:", _exact(served, _reference_greedy(thresholds_only, prompt_ids)))
        _check_agreement("thresholds-only server", thresholds_only, prompt_ids, served)


class TestDuoServer:
    """The W50+X50 checkpoint behind --api-key: equivalence, concurrency, bad requests, the chat CLI."""

    @pytest.fixture(scope="class")
    def server(self, w50x50, tmp_path_factory):
        yield from _serve(w50x50, tmp_path_factory.mktemp("srv") / "w50x50.log", "--api-key", API_KEY)

    def test_greedy_tokens_agree_with_the_reference(self, server, w50x50, prompt_ids):
        served = _served_greedy(server, w50x50, prompt_ids, api_key=API_KEY)
        print("W50+X50 server vs reference:", _exact(served, _reference_greedy(w50x50, prompt_ids)))
        _check_agreement("W50+X50 server", w50x50, prompt_ids, served)

    def test_concurrent_chat_requests(self, server, w50x50):
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        topics = ["the sea", "mountains", "Python", "bread", "the moon", "trains", "chess", "rain"]

        async def one(i: int):
            content = f"Tell me about {topics[i % 8]}. " + "Please be detailed. " * (i % 5) * 8
            max_tokens = (8, 16, 32, 64)[i % 4]
            kw = dict(model=str(w50x50), messages=[{"role": "user", "content": content}],
                      max_tokens=max_tokens, temperature=0.7 if i % 2 else 0)
            if i % 3 == 0:
                text, finish = "", None
                async for chunk in await client.chat.completions.create(stream=True, **kw):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                return text, finish, None, max_tokens
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens, max_tokens

        async def all_of_them():
            return await asyncio.gather(*(one(i) for i in range(32)))

        t0 = time.time()
        results = asyncio.run(all_of_them())
        print(f"32 concurrent chat requests in {time.time() - t0:.1f}s")
        for text, finish, used, max_tokens in results:
            assert isinstance(text, str) and finish in ("stop", "length")
            assert used is None or (used == max_tokens if finish == "length" else used <= max_tokens)
        assert server.proc.poll() is None

    def test_bad_requests_get_4xx_and_the_server_keeps_serving(self, server, w50x50):
        import httpx

        url, auth = f"{server.base_url}/v1", {"Authorization": f"Bearer {API_KEY}"}
        chat = {"model": str(w50x50), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        cases = {
            "invalid JSON": dict(content=b"{not json", headers={**auth, "Content-Type": "application/json"}),
            "unknown model": dict(json={**chat, "model": "no-such-model"}, headers=auth),
            "negative max_tokens": dict(json={**chat, "max_tokens": -5}, headers=auth),
            "over-long prompt": dict(json={**chat, "messages": [{"role": "user", "content": "word " * 3000}]},
                                     headers=auth),
        }
        with httpx.Client(timeout=120) as http:
            for name, kw in cases.items():
                r = http.post(f"{url}/chat/completions", **kw)
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
                assert http.get(f"{server.base_url}/health").status_code == 200, name
            r = http.post(f"{url}/chat/completions", json=chat, headers=auth)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None

    def test_api_key_is_required(self, server, w50x50):
        import httpx

        chat = {"model": str(w50x50), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=chat, timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer wrong"}
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=chat, headers=wrong, timeout=60)
        assert r.status_code == 401

    def test_demo_times_decoding(self, server, w50x50):
        from duo_vllm.serve.demo import decode_ms_per_token

        ms, received = decode_ms_per_token(f"{server.base_url}/v1", str(w50x50), 8, api_key=API_KEY)
        assert received == 8 and 0 < ms < 60_000, (ms, received)

    def test_duo_chat_streams_an_answer(self, server, w50x50):
        from openai import OpenAI

        # the greedy answer of the non-streaming API, for a question the pruned model answers with text
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
        for question in PROMPTS:
            r = client.chat.completions.create(model=str(w50x50), messages=[{"role": "user", "content": question}],
                                               max_tokens=16, temperature=0)
            if r.choices[0].message.content.strip():
                break
        expected = r.choices[0].message.content
        base = ["--base-url", f"{server.base_url}/v1", "--max-tokens", "16"]
        proc = subprocess.run([*_script("duo-chat"), *base, "--api-key", API_KEY, question],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected + "\n"
        proc = subprocess.run([*_script("duo-chat"), *base, "--api-key", "wrong", "--model", str(w50x50), "Hi"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "401" in proc.stderr
