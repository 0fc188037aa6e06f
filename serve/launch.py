"""duo-serve: check a duo checkpoint, then serve it with vLLM's OpenAI-compatible server.

    duo-serve CKPT [vllm serve args ...]

Runs `vllm serve CKPT --quantization duo ...` in this process, with this platform's engine settings
(`serve/engine.py`; CPU builds: --dtype float32, --enforce-eager, VLLM_CPU_KVCACHE_SPACE=4 GiB) unless
the command line or the environment already says otherwise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from duo_vllm.format import (
    QUANT_METHOD,
    DuoConfig,
    DuoFormatError,
    check_weights,
    load_thresholds,
    read_config,
    read_hf_config,
)
from duo_vllm.serve import engine
from duo_vllm.serve.vllm_cli import run_vllm

PROG = "duo-serve"


def check_checkpoint(ckpt: str | os.PathLike) -> DuoConfig:
    """The checkpoint's DuoConfig, after checking what can be checked without loading weights."""
    path = Path(ckpt)
    if not path.is_dir():
        raise DuoFormatError(f"{ckpt}: not a directory (duo-serve takes a local duo checkpoint)")
    cfg = read_config(path)
    config = read_hf_config(path)
    check_weights(path, config)
    load_thresholds(path)  # and checks them
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nAll other arguments are vLLM's: see `python -m duo_vllm.serve.vllm_cli serve --help`.")
        return 0 if argv else 2
    ckpt, args = argv[0], argv[1:]
    try:
        check_checkpoint(ckpt)
    except DuoFormatError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    extra = [] if engine.given(args, "--quantization", "-q") else ["--quantization", QUANT_METHOD]
    extra += engine.server_args(args, os.environ)
    return run_vllm(["serve", ckpt, *extra, *args])


if __name__ == "__main__":
    sys.exit(main())
