"""duo-serve: check a duo checkpoint, then serve it with vLLM's OpenAI-compatible server.

    duo-serve CKPT [vllm serve args ...]

Runs `vllm serve CKPT --quantization duo ...` in this process. On CPU builds of vLLM it adds
--dtype float32 (bf16 gives wrong text on CPUs without AVX512-BF16), --enforce-eager (compiled
start-up takes minutes) and VLLM_CPU_KVCACHE_SPACE=4 (GiB), unless the command line or the
environment already says otherwise.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from duo_vllm.format import (
    QUANT_METHOD,
    DuoConfig,
    DuoFormatError,
    check_thresholds,
    check_weights,
    load_thresholds,
    read_config,
    read_hf_config,
)
from serve.vllm_cli import run_vllm

PROG = "duo-serve"
CPU_KV_CACHE_GIB = "4"


def check_checkpoint(ckpt: str | os.PathLike) -> DuoConfig:
    """The checkpoint's DuoConfig, after checking what can be checked without loading weights."""
    path = Path(ckpt)
    if not path.is_dir():
        raise DuoFormatError(f"{ckpt}: not a directory (duo-serve takes a local duo checkpoint)")
    cfg = read_config(path)
    config = read_hf_config(path)
    check_weights(path, config)
    check_thresholds(load_thresholds(path), config["num_hidden_layers"], str(path))
    return cfg


def _given(args: list[str], *options: str) -> bool:
    """Whether any of the options appears in args, as '--opt', '--opt=value' or an -O level ('-O3')."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in options or ("-O" in options and arg.startswith("-O")):
            return True
    return False


def cpu_defaults(args: list[str], env: dict[str, str]) -> list[str]:
    """Arguments to add on a CPU build (the caller's choices win); sets the KV-cache env default in env."""
    extra: list[str] = []
    if not _given(args, "--dtype"):
        extra += ["--dtype", "float32"]
    if not _given(args, "--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config", "-cc"):
        extra.append("--enforce-eager")
    if not _given(args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    return extra


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nAll other arguments are vLLM's: see `python -m serve.vllm_cli serve --help`.")
        return 0 if argv else 2
    ckpt, args = argv[0], argv[1:]
    try:
        check_checkpoint(ckpt)
    except DuoFormatError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    extra = [] if _given(args, "--quantization", "-q") else ["--quantization", QUANT_METHOD]
    if is_cpu_build():
        extra += cpu_defaults(args, os.environ)
    return run_vllm(["serve", ckpt, *extra, *args])


if __name__ == "__main__":
    sys.exit(main())
