"""Ahead-of-time compile of every kernel launch for sm_90 (H100), which needs no GPU.

The interpreter runs the kernels as numpy and misses what only the GPU compiler checks (tl.dot shape
rules, layouts, register allocation); this compiles each launch configuration to a cubin and reads its
resource usage. It says nothing about speed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_compiles_for_sm90():
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton has no bundled cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    code = (
        "import json; from duo_vllm.kernels.triton_kernels import compile_report\n"
        "print(json.dumps(compile_report(arch=90, n=4096, k=4096, batches=(1, 4, 16, 64))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in report}
    assert kernels == {"_bitmap_kernel", "_act_sparse_kernel", "_splitk_reduce_kernel"}
    for r in report:
        assert r["local"] == 0, f"register spills to local memory: {r}"
        assert r["registers"] <= 255, r
