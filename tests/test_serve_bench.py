"""A tiny run of benchmarks/serve_bench.py: dense SmolLM2 and its W50+X50 checkpoint under `vllm bench serve`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[cpu]' or '.[gpu]')")
pytestmark = pytest.mark.slow

from duo_vllm.serve.engine import is_cpu_build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_serve_bench_tiny(smollm2_dir, duo_checkpoint, tmp_path):
    ckpt = duo_checkpoint("duogpt", 0.5, 0.5)
    out = tmp_path / "serve_bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--dense", str(smollm2_dir), "--duo", str(ckpt),
           "--concurrency", "1", "2", "--input-len", "16", "--output-len", "8", "--prompts", "2",
           "--max-model-len", "256", "--work", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["concurrency"] == [1, 2]
    for c in ("1", "2"):
        for side in ("dense", "duo"):
            run = result[side][c]
            assert run["completed"] == 2 and run["total_output_tokens"] == 2 * 8  # --ignore-eos: every token
            assert run["median_tpot_ms"] > 0 and run["output_throughput"] > 0
        assert result["ratios"][c]["median_tpot_ms"] == pytest.approx(
            result["duo"][c]["median_tpot_ms"] / result["dense"][c]["median_tpot_ms"])
    if is_cpu_build():  # both servers ran with the CPU settings duo-serve uses
        assert result["server_args"][-3:] == ["--dtype", "float32", "--enforce-eager"]
    assert "| 1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
