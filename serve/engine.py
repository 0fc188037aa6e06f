"""The engine settings vLLM runs with here, per platform, written once.

duo-serve, the demo, zero-shot evaluation through vllm.LLM and the serving benchmarks all take their
settings from this module, so a dense model and its duo checkpoint always run alike, and evaluation
scores the code path that serving runs.

CPU builds of vLLM: --dtype float32 (bf16 gives wrong text on CPUs without AVX512-BF16),
--enforce-eager (compiled start-up takes minutes) and VLLM_CPU_KVCACHE_SPACE=4 GiB (vLLM's own default
reserves a large share of RAM). Other platforms: vLLM's own defaults.
"""
from __future__ import annotations

CPU_KV_CACHE_GIB = "4"
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def is_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def given(args: list[str], *options: str) -> bool:
    """Whether any of the options appears in args, as '--opt', '--opt=value' or an -O level ('-O3')."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in options or ("-O" in options and arg.startswith("-O")):
            return True
    return False


def server_args(args: list[str], env: dict[str, str], cpu: bool | None = None) -> list[str]:
    """`vllm serve` arguments to add to args on this platform (the caller's own choices win); sets the
    environment defaults in env. cpu: the platform (default: the installed vLLM's)."""
    if not (is_cpu_build() if cpu is None else cpu):
        return []
    extra: list[str] = []
    if not given(args, "--dtype"):
        extra += ["--dtype", "float32"]
    if not given(args, "--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config", "-cc"):
        extra.append("--enforce-eager")
    if not given(args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        env.setdefault(KV_CACHE_ENV, CPU_KV_CACHE_GIB)
    return extra


def engine_kwargs(env: dict[str, str], cpu: bool | None = None) -> dict:
    """Keyword arguments for vllm.LLM (and lm-eval's vllm backend) on this platform, as `server_args`
    gives the server; sets the environment defaults in env."""
    if not (is_cpu_build() if cpu is None else cpu):
        return {}
    env.setdefault(KV_CACHE_ENV, CPU_KV_CACHE_GIB)
    return {"dtype": "float32", "enforce_eager": True}
