"""duo-calibrate --resume on the real SmolLM2: killed at a block, continued, equal to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duo_vllm.calibrate.resume import state_dir

# One thread: the runs compared must use the same one, and a competing process cannot slow it 10x.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "duo_vllm.calibrate.cli", "--model", str(model), "--out", str(out),
            "--nsamples", "4", "--seqlen", "128", *extra]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=1800)


def _kill_after_block(argv: list[str], out: Path, block: int) -> None:
    """Start a run and SIGKILL it as soon as block `block` is kept in the resume directory."""
    done = state_dir(out) / f"block-{block:04d}.safetensors"
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while not done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"


def _files(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ckpt.iterdir() if p.name != "duo_report.json"}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_checkpoint(smollm2_dir, tmp_path):
    whole = tmp_path / "whole"
    proc = _run(_argv(smollm2_dir, whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not state_dir(whole).exists()  # removed once the checkpoint is written

    out = tmp_path / "resumed"
    _kill_after_block(_argv(smollm2_dir, out), out, block=11)
    assert not out.exists()
    kept = sorted(p.name for p in state_dir(out).glob("block-*"))
    assert kept[:12] == [f"block-{i:04d}.safetensors" for i in range(12)]
    assert not list(state_dir(out).glob(".*tmp*"))  # only whole files

    # the same command without --resume does not throw the finished blocks away
    proc = _run(_argv(smollm2_dir, out))
    assert proc.returncode == 2 and "pass --resume to continue it, or --force to start over" in proc.stderr
    # other settings or other data: refused, naming what differs
    proc = _run(_argv(smollm2_dir, out, "--resume", "--weight-sparsity", "0.4"))
    assert proc.returncode == 2 and "settings.weight_sparsity: 0.5 then, 0.4 now" in proc.stderr, proc.stderr[-2000:]
    proc = _run(_argv(smollm2_dir, out, "--resume", "--seed", "1"))
    assert proc.returncode == 2 and "calibration data:" in proc.stderr and "settings.seed: 0 then, 1 now" in proc.stderr

    proc = _run(_argv(smollm2_dir, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not state_dir(out).exists()
    assert _files(out) == _files(whole)  # weights, thresholds, config, tokenizer: bit for bit
    report, whole_report = (json.loads((d / "duo_report.json").read_text()) for d in (out, whole))
    assert report["resumed_blocks"] >= 12 and whole_report["resumed_blocks"] == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "block_seconds"} for r in rows]  # noqa: E731
    assert strip(report["layers"]) == strip(whole_report["layers"])
