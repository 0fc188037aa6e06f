"""benchmarks/gpu_check.py without a GPU: argument checks, wheel unpacking, the crossover summary."""
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_and_bad_arguments():
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--steps", "tests"], capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "run", "--steps", "tests,lunch"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "unknown steps ['lunch']" in done.stderr


def test_unpack(tmp_path):
    gc = _module()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with pytest.raises(SystemExit, match="no wheels"):
        gc.unpack(wheels, tmp_path / "site")
    for name in ("pytest", "pydantic", "pydantic_core", "pluggy"):
        with zipfile.ZipFile(wheels / f"{name}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "")
    site = gc.unpack(wheels, tmp_path / "site")
    assert (site / "pydantic_core" / "__init__.py").is_file()


def test_crossover_markdown():
    gc = _module()
    rows = []
    for method, us in (("dense", 30.0), ("dense_thr", 32.0), ("teal", 20.0), ("wsparse", 25.0), ("dual", 12.0)):
        rows.append(dict(linear="qkv", n=12288, k=4096, m=1, p_w=0.5, p_x=0.5, method=method, time_us=us,
                         tb_per_s=3.0 * 30 / us, speedup=30.0 / us, ideal_speedup=1.0))
    md = gc.crossover_markdown({"device": "H100", "dtype": "bf16", "rows": rows})
    line = [x for x in md.splitlines() if x.startswith("| qkv")][0]
    assert "12.0 µs, 7.50 TB/s, 2.50×" in line and line.endswith("| dual |")
    rows[-1]["time_us"] = None  # untimed (the --cpu-check JSON): no winner among the untimed
    rows[-2]["time_us"] = None
    line = [x for x in gc.crossover_markdown({"device": "cpu", "dtype": "bf16", "rows": rows}).splitlines()
            if x.startswith("| qkv")][0]
    assert line.endswith("| dense_thr |") and "– (ideal 1.00×)" in line
