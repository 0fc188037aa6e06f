"""benchmarks/soak.py on the W50+X50 SmolLM2 checkpoint: 64 clients for 120 s against one duo-serve."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 64
DURATION_S = 120


def test_soak_64_clients_for_two_minutes(duo_checkpoint, tmp_path):
    ckpt = duo_checkpoint("duogpt", 0.5, 0.5)
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--ckpt", str(ckpt), "--clients", str(CLIENTS),
           "--duration", str(DURATION_S), "--work", str(tmp_path), "--out", str(out)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(result["table"])
    req, health, rss = result["requests"], result["health"], result["rss_mib"]
    assert req["errors"] == 0 and result["warmup"]["errors"] == 0, result["error_messages"]
    assert req["started"] == req["finished"] + req["disconnected"]
    # every finished response ended with a finish_reason, and only with these
    assert sum(result["finish_reasons"].values()) == req["finished"]
    assert set(result["finish_reasons"]) <= {"stop", "length"}
    assert req["finished"] >= CLIENTS and result["completion_tokens"] >= req["finished"]
    assert req["disconnected"] > 0
    assert health["failed"] == 0 and health["ok"] > 100
    assert result["engine_after"]["idle"], result["engine_after"]
    assert result["server_alive"]
    assert rss["end"] <= rss["start"] * 1.15 + 64, rss["series"]
    assert out.with_suffix(".md").read_text().count("| requests started |") == 1
