"""The end of `make demo`: serve a duo checkpoint, ask it one question through the OpenAI client, time
its decoding, stop it; then (with --dense) the same for the dense model; print both answers and both
speeds side by side.

    python -m duo_vllm.serve.demo CKPT [--dense MODEL_DIR] [--port 8765] [--question "..."]

The timing is one streamed completion of --decode-tokens tokens (greedy, ignore_eos): milliseconds per
output token after the first. A quick look, not the benchmark (benchmarks/serve_bench.py is).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

from duo_vllm.format import read_config
from duo_vllm.serve import chat
from duo_vllm.serve.server import ServerProcess, console_script

DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."


def decode_ms_per_token(base_url: str, model: str, tokens: int, api_key: str = "unused") -> tuple[float, int]:
    """(milliseconds between streamed output tokens, tokens received) of one greedy completion."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    stamps = []
    stream = client.completions.create(model=model, prompt="The history of the city begins", max_tokens=tokens,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    received = 0
    for chunk in stream:
        if chunk.choices:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            received = chunk.usage.completion_tokens
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1) * 1e3, received


def _serve(cmd: list[str], port: int) -> ServerProcess:
    print("+", " ".join(cmd), flush=True)
    return ServerProcess(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), port=port)


def ask(base_url: str, model: str, question: str, max_tokens: int = 64) -> str:
    """One greedy chat answer, whole."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    return chat.chat(client, model, [{"role": "user", "content": question}], max_tokens, 0.0, out=io.StringIO())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="duo-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--dense", default=None, help="the dense model the checkpoint came from: ask and time it too")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server to start")
    args = p.parse_args(argv)
    cfg = read_config(args.ckpt)
    duo = f"duo ({cfg.method}, W{cfg.weight_sparsity * 100:.0f}+X{cfg.act_sparsity * 100:.0f})"
    common = ["--max-model-len", "2048"]
    answers, speeds = {}, {}
    with _serve([*console_script("duo-serve", "duo_vllm.serve.launch"), args.ckpt, "--served-model-name", "duo", *common],
                args.port) as server:
        server.wait_ready(args.timeout)
        answers[duo] = ask(f"{server.base_url}/v1", "duo", args.question)
        speeds[duo] = decode_ms_per_token(f"{server.base_url}/v1", "duo", args.decode_tokens)[0]
    print("server stopped", flush=True)
    if args.dense:
        # the dense model under the engine settings duo-serve uses
        from duo_vllm.serve import engine

        with _serve([sys.executable, "-m", "duo_vllm.serve.vllm_cli", "serve", args.dense, "--served-model-name", "dense",
                     *common, *engine.server_args(common, os.environ)], args.port) as server:
            server.wait_ready(args.timeout)
            answers["dense"] = ask(f"{server.base_url}/v1", "dense", args.question)
            speeds["dense"] = decode_ms_per_token(f"{server.base_url}/v1", "dense", args.decode_tokens)[0]
        print("dense server stopped", flush=True)
    width = max(map(len, answers))
    print(f"\nuser: {args.question}")
    for name, answer in answers.items():
        print(f"{name:>{width}}: {answer.strip() or '(no text: the model ended its turn at once; small models do this at high sparsity, try a lower one)'}")
    line = ", ".join(f"{name} {ms:.1f} ms/token" for name, ms in speeds.items())
    if "dense" in speeds:
        line += f" (duo/dense {speeds[duo] / speeds['dense']:.2f}x)"
    print(f"decode speed, {args.decode_tokens} tokens, one request: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
