"""The end of `make demo`: serve a duo checkpoint, ask it one question through the OpenAI client, stop it.

    python -m serve.demo CKPT [--port 8765] [--question "..."]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

from serve import chat

DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the server at {base} was not ready after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="duo-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server to start")
    args = p.parse_args(argv)
    base = f"http://127.0.0.1:{args.port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "serve.launch", args.ckpt, "--host", "127.0.0.1", "--port", str(args.port),
           "--served-model-name", "duo", "--max-model-len", "2048"]
    print("+", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        wait_healthy(base, server, args.timeout)
        print(f"\nuser: {args.question}\nassistant: ", end="", flush=True)
        return chat.main(["--base-url", f"{base}/v1", "--model", "duo", "--max-tokens", "64", args.question])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
