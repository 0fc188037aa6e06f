"""benchmarks/kernel_bench.py runs without a GPU: --cpu-check, the no-CUDA refusal, the checkpoint mode."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import HAS_CUDA
from safetensors.torch import save_file

from duo_vllm.format import LINEAR_NAMES, threshold_name
from duo_vllm.kernels import channel_bytes, pack_weight

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_bench.py"


def _bench_module():
    if str(BENCH.parent) not in sys.path:  # as when run as a script: its folder is on the path
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without CUDA")
def test_cli_without_cuda(tmp_path):
    pytest.importorskip("triton")
    refused = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True)
    assert refused.returncode == 2 and "no CUDA device" in refused.stderr
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(BENCH), "--cpu-check", "--batches", "1,4", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert not result["timed"] and all(r["time_us"] is None for r in result["rows"])
    assert {r["method"] for r in result["rows"]} == {"dense", "dense_thr", "teal", "wsparse", "dual"}


def test_checkpoint_report(tmp_path):
    gen = torch.Generator().manual_seed(0)
    hidden, inter, layers = 64, 96, 2
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (32, hidden), "self_attn.v_proj": (32, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    tensors, acts = {}, {}
    for i in range(layers):
        for name in LINEAR_NAMES:
            w = torch.randn(*shapes[name], generator=gen)
            w[torch.rand(w.shape, generator=gen) < 0.5] = 0
            tensors[f"model.layers.{i}.{name}.weight"] = w.to(torch.bfloat16)
            tensors[threshold_name(i, name)] = torch.tensor(0.7)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            acts[f"model.layers.{i}.{name}"] = torch.randn(12, shapes[name][1], generator=gen).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))  # thresholds are read against it
    torch.save(acts, tmp_path / "acts.pt")

    rows = _bench_module().checkpoint_report(str(tmp_path), str(tmp_path / "acts.pt"), batches=[1, 4])
    groups = ("qkv", "o", "gate_up", "down")
    assert [(r["layer"], r["group"]) for r in rows] == [(i, g) for i in range(layers) for g in groups]
    r = rows[0]  # layer 0 fused qkv
    w = torch.cat([tensors[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    assert (r["n"], r["k"]) == (128, 64)
    live = acts["model.layers.0.self_attn.q_proj"].abs() > 0.7
    want = (live.double() @ channel_bytes(pack_weight(w)).double()).mean().item() / (128 * 64 * 2)
    assert r["touched_ratio_b1"] == pytest.approx(want)
    assert r["touched_ratio_b1"] <= r["touched_ratio_b4"] <= r["format_ratio"]
