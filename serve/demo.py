"""The end of `make demo`: serve a duo checkpoint, ask it one question through the OpenAI client, stop it.

    python -m serve.demo CKPT [--port 8765] [--question "..."]
"""
from __future__ import annotations

import argparse
import os
import sys

from serve import chat
from serve.server import ServerProcess, console_script

DEFAULT_QUESTION = "What is the capital of France? Answer in one sentence."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="duo-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server to start")
    args = p.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [*console_script("duo-serve", "serve.launch"), args.ckpt, "--served-model-name", "duo",
           "--max-model-len", "2048"]
    print("+", " ".join(cmd), flush=True)
    with ServerProcess(cmd, env=env, port=args.port) as server:
        server.wait_ready(args.timeout)
        print(f"\nuser: {args.question}\nassistant: ", end="", flush=True)
        status = chat.main(["--base-url", f"{server.base_url}/v1", "--model", "duo", "--max-tokens", "64",
                            args.question])
    print("server stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
