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

from duo_vllm.format import DuoConfig, DuoFormatError, LINEAR_NAMES, threshold_name
from serve import chat, launch


def _fake_checkpoint(path, layers: int = 2, skip: str | None = None, arch: str = "LlamaForCausalLM"):
    path.mkdir()
    config = {"architectures": [arch], "num_hidden_layers": layers,
              "quantization_config": DuoConfig().model_dump()}
    (path / "config.json").write_text(json.dumps(config))
    tensors = {threshold_name(i, n): torch.tensor(0.1) for i in range(layers) for n in LINEAR_NAMES}
    tensors.pop(skip, None)
    save_file(tensors, str(path / "duo_thresholds.safetensors"))
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
    # weights (here: thresholds) for more layers than config.json says
    ckpt = _fake_checkpoint(tmp_path / "extra-layer", layers=3)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(DuoFormatError, match="thresholds for layer 2, but config.json has num_hidden_layers 2"):
        launch.check_checkpoint(ckpt)


def test_cpu_defaults_yield_to_the_user():
    env: dict[str, str] = {}
    assert launch.cpu_defaults([], env) == ["--dtype", "float32", "--enforce-eager"]
    assert env == {"VLLM_CPU_KVCACHE_SPACE": launch.CPU_KV_CACHE_GIB}
    env = {"VLLM_CPU_KVCACHE_SPACE": "8"}
    assert launch.cpu_defaults(["--dtype=bfloat16", "-O3"], env) == []
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "8"}
    env = {}
    assert launch.cpu_defaults(["--no-enforce-eager", "--kv-cache-memory-bytes", "1G"], env) == ["--dtype", "float32"]
    assert env == {}


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
    code = ("import importlib.metadata as m; from serve.vllm_cli import ensure_vllm_version; "
            "ensure_vllm_version(); print(m.version('vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out[0].isdigit()  # '0.32.0+cpu' on vllm-cpu, the real version elsewhere
    proc = subprocess.run([sys.executable, "-m", "serve.vllm_cli", "--version"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == out
