"""benchmarks/kernel_static.py: the SASS loop parser, the sector byte model, one compiled record."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_static.py"


def _module():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("kernel_static_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    spec.loader.exec_module(mod)  # pops TRITON_INTERPRET (it compiles); put it back for the other tests
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved
    return mod


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/               @P0 FFMA R3, R2, R2, R3 ;
        /*0040*/                   POPC R5, R2 ;
        /*0050*/              @!P1 BRA 0x20 ;
        /*0060*/                   FADD R3, R3, R3 ;
        /*0070*/                   BRA 0x60 ;
        /*0080*/                   EXIT ;
"""


def test_sass_parser():
    ks = _module()
    instrs = ks.parse_sass(SASS)
    assert len(instrs) == 9 and instrs[3] == (0x30, "@P0 FFMA R3, R2, R2, R3")
    assert ks.opcode("@!P1 LDG.E.U16 R1, desc[UR4][R2.64]") == "LDG"
    loops = ks.find_loops(instrs)
    assert [(lp["start"], lp["end"], lp["count"]) for lp in loops] == [(0x20, 0x50, 4), (0x60, 0x70, 2)]
    b = ks.sass_budget(SASS)
    assert (b["hot"], b["before"], b["after"], b["outside"], b["last_block"]) == (4, [], [2], 3, 0)
    assert b["hot_ops"] == {"LDG": 1, "FFMA": 1, "POPC": 1, "BRA": 1}


def test_sector_bytes():
    ks = _module()
    # two tiles x 4 channels, bf16, block_n 128: mask 16 B, offset 4 B per segment
    counts = torch.tensor([[16, 0, 20, 3], [1, 1, 1, 1]])
    live = torch.tensor([True, False, True, False])
    useful, sectors = ks.sector_bytes(counts, live, 128, 2)
    assert useful == (16 + 20 + 1 + 1) * 2 + 4 * (16 + 4)
    # masks: segments 0, 2, 4, 6 at bytes 0, 32, 64, 96 -> 4 sectors; offsets: bytes 0..27 -> 1 sector;
    # values: segment 0 [0, 16] -> elements 0..16 = bytes 0..33 (sectors 0-1), segment 2 starts at 16:
    # [16, 36] -> bytes 32..73 (sectors 1-2), segment 4 starts at 39: [39, 40] -> bytes 78..81 (2),
    # segment 6 starts at 41: [41, 42] -> bytes 82..85 (2): union = sectors 0, 1, 2
    assert sectors == (4 + 1 + 3) * 32


def test_decode_record_small():
    pytest.importorskip("triton")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("this triton has no NVIDIA backend")
    code = (
        "import sys, json; sys.path.insert(0, 'benchmarks'); import kernel_static as ks\n"
        "from duo_vllm.kernels import triton_kernels as tk\n"
        "r = ks.decode_record(tk, ks.Compiler(tk), 'toy', 'a', 1024, 2048, 1, 'bf16', 0.5, 0.5)\n"
        "print(json.dumps(r))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["spills"] == 0 and r["grid"].startswith("8x")
    assert 0.4 < r["live_fraction"] < 0.6
    # the hot loop visits about half the channels: per dense element ~ half the per-visited figure
    assert r["warp_instr_per_element"] == pytest.approx(r["instr_per_visited_element"] * r["live_fraction"], rel=0.15)
    # bytes: at least the ideal (values + masks + offsets of the live channels), sector rounding adds < 40 %
    ideal = r["live_fraction"] * (0.5 * 2 + 16 / 128 + 4 / 128)
    assert ideal <= r["bytes_per_element"] - (2048 + 1024) * 2 / (1024 * 2048) < 1.4 * ideal
    assert r["implied_us"] == pytest.approx(max(r["bytes_us"], r["issue_us"]))
    assert r["resident_ratio"] == pytest.approx(0.5 + 1 / 16 + 2 / 128, abs=0.01)
