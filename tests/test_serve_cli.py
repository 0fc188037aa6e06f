"""duo-serve / duo-chat / the vLLM CLI wrapper without starting a server (fast, no model)."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from duo_vllm.format import SUPPORTED_ARCHITECTURES, DuoConfig, DuoFormatError, LINEAR_NAMES, threshold_name
from duo_vllm.serve import chat, launch


TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)


def _fake_checkpoint(path, layers: int = 2, skip: str | None = None, arch: str = "LlamaForCausalLM"):
    """A random duo checkpoint (weights not pruned: nothing here loads them), `skip` left out."""
    import transformers

    family = arch if arch in SUPPORTED_ARCHITECTURES else "LlamaForCausalLM"  # a refused one: LLaMA weights
    config = getattr(transformers, family.replace("ForCausalLM", "Config"))(num_hidden_layers=layers, **TINY)
    getattr(transformers, family)(config).save_pretrained(path, safe_serialization=True)
    _edit_config(path, architectures=[arch], quantization_config=DuoConfig().model_dump())
    tensors = {threshold_name(i, n): torch.tensor(0.1) for i in range(layers) for n in LINEAR_NAMES}
    tensors.pop(skip, None)
    save_file(tensors, str(path / "duo_thresholds.safetensors"))
    return path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_check_checkpoint(tmp_path):
    assert launch.check_checkpoint(_fake_checkpoint(tmp_path / "ok")).quant_method == "duo"
    with pytest.raises(DuoFormatError, match="model.layers.1.mlp.up_proj.input_threshold"):
        launch.check_checkpoint(_fake_checkpoint(tmp_path / "hole", skip=threshold_name(1, "mlp.up_proj")))
    with pytest.raises(DuoFormatError, match="GemmaForCausalLM.*not supported"):
        launch.check_checkpoint(_fake_checkpoint(tmp_path / "arch", arch="GemmaForCausalLM"))
    for arch in ("MistralForCausalLM", "Qwen2ForCausalLM"):
        assert launch.check_checkpoint(_fake_checkpoint(tmp_path / arch, arch=arch)).quant_method == "duo"
    with pytest.raises(DuoFormatError, match="not a directory"):
        launch.check_checkpoint(tmp_path / "missing")


def _rewrite_threshold(path, name, tensor):
    from safetensors.torch import load_file

    f = path / "duo_thresholds.safetensors"
    tensors = load_file(str(f))
    tensors[name] = tensor
    save_file(tensors, str(f))


def test_corrupt_checkpoints_are_named(tmp_path, capsys):
    # a shard truncated to half (what a full disk or an interrupted copy leaves)
    ckpt = _fake_checkpoint(tmp_path / "truncated")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)}, str(ckpt / "model.safetensors"))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DuoFormatError, match=r"model\.safetensors: not a readable safetensors file"):
        launch.check_checkpoint(ckpt)
    capsys.readouterr()  # transformers' progress bars
    assert launch.main([str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duo-serve: error:") and "model.safetensors" in err and "Traceback" not in err
    # a shard that is not safetensors at all
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(DuoFormatError, match="not a readable safetensors file"):
        launch.check_checkpoint(ckpt)
    # thresholds of the wrong shape or dtype
    name = threshold_name(1, "mlp.down_proj")
    for bad, what in ((torch.tensor([0.1, 0.1]), "float32 of shape \\[2\\]"),
                      (torch.tensor(0.1, dtype=torch.float16), "float16 of shape \\[\\]")):
        ckpt = _fake_checkpoint(tmp_path / f"bad-{bad.dtype}-{bad.dim()}")
        _rewrite_threshold(ckpt, name, bad)
        with pytest.raises(DuoFormatError, match=f"threshold {name} is {what} \\(expected a float32 scalar\\)"):
            launch.check_checkpoint(ckpt)
    # a threshold file missing altogether
    ckpt = _fake_checkpoint(tmp_path / "no-thresholds")
    (ckpt / "duo_thresholds.safetensors").unlink()
    with pytest.raises(DuoFormatError, match=r"no input thresholds in any \*\.safetensors file \(is "
                                             r"duo_thresholds\.safetensors missing\?\)"):
        launch.check_checkpoint(ckpt)
    # only thresholds for more layers than config.json says
    ckpt = _fake_checkpoint(tmp_path / "extra-thresholds", layers=3)
    with __import__("safetensors").safe_open(str(ckpt / "model.safetensors"), "pt") as sf:
        kept = {k: sf.get_tensor(k) for k in sf.keys() if not k.startswith("model.layers.2.")}
    save_file(kept, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    _edit_config(ckpt, num_hidden_layers=2)
    with pytest.raises(DuoFormatError, match="thresholds for layer 2, but config.json has num_hidden_layers 2"):
        launch.check_checkpoint(ckpt)


def test_configs_that_disagree_with_the_weights_are_named(tmp_path, capsys):
    # weights of three layers, config.json says two (and the other way round)
    ckpt = _edit_config(_fake_checkpoint(tmp_path / "more-layers", layers=3), num_hidden_layers=2)
    with pytest.raises(DuoFormatError, match=r"model\.safetensors: model\.layers\.2\.\S+ is a weight of layer 2, "
                                             r"but .*config\.json has num_hidden_layers 2"):
        launch.check_checkpoint(ckpt)
    ckpt = tmp_path / "fewer-layers"
    _edit_config(_fake_checkpoint(ckpt, layers=2), num_hidden_layers=3)
    with pytest.raises(DuoFormatError, match=r"no \*\.safetensors file holds model\.layers\.2\.\S+ \(and 8 more\)"):
        launch.check_checkpoint(ckpt)
    # LLaMA weights under a Qwen2 config (q/k/v biases missing), Qwen2 weights under a LLaMA config
    ckpt = tmp_path / "llama-as-qwen2"
    _edit_config(_fake_checkpoint(ckpt), architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with pytest.raises(DuoFormatError, match=r"holds model\.layers\.0\.self_attn\.q_proj\.bias .*Qwen2ForCausalLM"):
        launch.check_checkpoint(ckpt)
    ckpt = tmp_path / "qwen2-as-llama"
    _edit_config(_fake_checkpoint(ckpt, arch="Qwen2ForCausalLM"), architectures=["LlamaForCausalLM"],
                 model_type="llama")
    with pytest.raises(DuoFormatError, match=r"model\.layers\.0\.self_attn\.[qkv]_proj\.bias is not a tensor of the "
                                             r"LlamaForCausalLM"):
        launch.check_checkpoint(ckpt)
    # sizes that disagree
    ckpt = tmp_path / "wider"
    _edit_config(_fake_checkpoint(ckpt), intermediate_size=48)
    with pytest.raises(DuoFormatError, match=r"mlp\.down_proj\.weight has shape \[16, 32\], but .* implies \[16, 48\]"):
        launch.check_checkpoint(ckpt)
    capsys.readouterr()  # transformers' progress bars
    assert launch.main([str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duo-serve: error:") and "down_proj" in err and "Traceback" not in err


def test_quantization_configs_that_cannot_be_served_are_named(tmp_path, capsys):
    for name, change, message in (
            ("newer", {"format_version": 2}, "format_version 2 is newer than this duo-vllm reads"),
            ("unknown", {"sparsity_pattern": "2:4"}, "sparsity_pattern: Extra inputs are not permitted"),
            ("missing", {"weight_sparsity": None}, "lacks weight_sparsity")):
        ckpt = _fake_checkpoint(tmp_path / name)
        qc = {**DuoConfig().model_dump(), **change}
        _edit_config(ckpt, quantization_config={k: v for k, v in qc.items() if v is not None})
        capsys.readouterr()
        assert launch.main([str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert message in err and "config.json" in err and "Traceback" not in err, err


def test_engine_settings_yield_to_the_user():
    from duo_vllm.serve import engine

    env: dict[str, str] = {}
    assert engine.server_args([], env, cpu=True) == ["--dtype", "float32", "--enforce-eager"]
    assert env == {"VLLM_CPU_KVCACHE_SPACE": engine.CPU_KV_CACHE_GIB}
    env = {"VLLM_CPU_KVCACHE_SPACE": "8"}
    assert engine.server_args(["--dtype=bfloat16", "-O3"], env, cpu=True) == []
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "8"}
    env = {}
    assert engine.server_args(["--no-enforce-eager", "--kv-cache-memory-bytes", "1G"], env, cpu=True) == [
        "--dtype", "float32"]
    assert env == {}
    # vllm.LLM gets what the server gets; other platforms run vLLM's own defaults
    assert engine.engine_kwargs(env, cpu=True) == {"dtype": "float32", "enforce_eager": True}
    assert env == {"VLLM_CPU_KVCACHE_SPACE": engine.CPU_KV_CACHE_GIB}
    env = {}
    assert engine.server_args([], env, cpu=False) == [] and engine.engine_kwargs(env, cpu=False) == {} and env == {}


def test_duo_serve_usage_errors(tmp_path, capsys):
    assert launch.main([]) == 2
    assert launch.main([str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert launch.main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_duo_chat_reports_an_unreachable_server(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert chat.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m", "Hi"]) == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_cli_wrapper_answers_the_version_lookup():
    code = ("import importlib.metadata as m; from duo_vllm.serve.vllm_cli import ensure_vllm_version; "
            "ensure_vllm_version(); print(m.version('vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out[0].isdigit()  # '0.32.0+cpu' on vllm-cpu, the real version elsewhere
    proc = subprocess.run([sys.executable, "-m", "duo_vllm.serve.vllm_cli", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == out
