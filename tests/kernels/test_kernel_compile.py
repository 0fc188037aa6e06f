"""Ahead-of-time compile of every kernel launch for sm_90 (H100), which needs no GPU.

The interpreter runs the kernels as numpy and misses what only the GPU compiler checks (tl.dot shape
rules, layouts, register allocation); this compiles each launch configuration to a cubin, reads its
resource usage, and reads the decode kernel's hot loop in the SASS (benchmarks/kernel_static.py's
parser). Static properties only: it says nothing measured about speed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
sys.path.insert(0, "tests/kernels")
import kernel_static as ks
from kernel_helpers import compile_report
from duo_vllm.kernels import triton_kernels as tk
report = {"resources": [], "hot": {}}
for dtype in (torch.bfloat16, torch.float16):
    for r in compile_report(arch=90, n=4096, k=4096, batches=(1, 2, 4, 8, 16, 64), dtype=dtype):
        report["resources"].append(dict(r, dtype=str(dtype)))
p = tk._meta_packed(12288, 4096, torch.bfloat16)
x, t = torch.empty(1, 4096, dtype=torch.bfloat16, device="meta"), torch.empty(1, device="meta")
x4 = torch.empty(4, 4096, dtype=torch.bfloat16, device="meta")
launches = {"decode": tk.decode_call(x, t, p, None, slots=132 * 16)[1],
            "decode4": tk.decode_call(x4, t, p, None, slots=132 * 5)[1],
            "v0": tk._calls(tk._bitmap_kernel, (p.values, p.masks, p.offsets), x, t, 12288, 128, None, None, None, 2,
                            SKIP_CHANNELS=True)[1][0]}
for name, launch in launches.items():
    b = ks.sass_budget(tk.aot_compile(launch)["sass"])
    report["hot"][name] = dict(b, num_warps=launch[4], constexprs={k: v for k, v in launch[3].items()
                                                                   if isinstance(v, (int, bool))})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton has no NVIDIA backend (no bundled cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_variant_compiles_without_spills(report):
    rows = report["resources"]
    decode = {(r["dtype"], r["m"], r["variant"]) for r in rows if r["kernel"] == "_decode_kernel"}
    for dtype in ("torch.bfloat16", "torch.float16"):
        for m in (1, 2, 4, 8, 16):  # dual + weight-sparse-only with split-K, dual with the direct store
            assert {(dtype, m, v) for v in ("decode skip=True split=auto", "decode skip=False split=auto",
                                            "decode skip=True split=1")} <= decode
    assert {r["kernel"] for r in rows} == {"_decode_kernel", "_bitmap_kernel", "_act_sparse_kernel"}
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0, f"register spills to local memory: {r}"
        assert r["registers"] <= 255, r
    # occupancy: >= 8 warps per SM at every decode M
    sys.path.insert(0, str(ROOT))
    from duo_vllm.kernels.triton_kernels import programs_per_sm

    for r in rows:
        if r["kernel"] == "_decode_kernel":
            assert programs_per_sm(r["registers"], r["num_warps"]) * r["num_warps"] >= 8, r


def test_decode_hot_loop_budget(report):
    """The decode hot loop at M = 1: one warp per program (its one shared-memory exchange per iteration has
    a warp-local barrier), one value gather and one FMA per element, at most 0.36 warp instructions per
    element it visits; with 4 warps (M = 4) no barrier, shuffle or shared memory in the loop at all."""
    hot = report["hot"]["decode"]
    ops = hot["hot_ops"]
    assert hot["num_warps"] == 1 and ops.get("BAR", 0) <= 2
    four = report["hot"]["decode4"]
    assert four["num_warps"] == 4
    for op in ("BAR", "SHFL", "LDS", "STS"):
        assert op not in four["hot_ops"], f"{op} in the 4-warp decode hot loop: {four['hot_ops']}"
    cst = hot["constexprs"]
    per_thread = cst["CHUNK"] * cst["BLOCK_N"] // (32 * hot["num_warps"])
    assert ops["FFMA"] == per_thread  # one FMA per element (predicated where the bit is clear)
    assert ops["POPC"] <= 2 * per_thread
    per_element = hot["hot"] * hot["num_warps"] / (cst["CHUNK"] * cst["BLOCK_N"])
    assert per_element <= 0.36, (per_element, hot)
    # the same parser on the previous kernel finds its per-iteration cumsum (the check can fail)
    old = report["hot"]["v0"]
    assert old["hot_ops"].get("BAR", 0) > 0 and old["hot_ops"].get("SHFL", 0) > 0
    old_cst = old["constexprs"]
    assert old["hot"] * old["num_warps"] / (old_cst["BLOCK_K"] * old_cst["BLOCK_N"]) > 4 * per_element
