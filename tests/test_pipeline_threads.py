"""Calibration on CPU takes one thread per core other processes leave free (calibrate/pipeline.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from duo_vllm.calibrate import pipeline


@pytest.mark.parametrize("busy, expected", [(None, 2), (0.0, 2), (0.6, 2), (0.8, 1), (1.0, 1), (2.0, 1)])
def test_threads_follow_the_cores_left_free(monkeypatch, busy, expected):
    monkeypatch.setattr(pipeline, "_cpu_busy_elsewhere", lambda: busy)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert pipeline._cpu_threads(max_threads=2) == expected
    assert pipeline._cpu_threads(max_threads=1) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux /proc/stat")
def test_a_busy_process_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        pipeline._cpu_busy_elsewhere(0.3)  # let it start
        seen = pipeline._cpu_busy_elsewhere(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and seen >= 0.75, seen
