"""duo-chat: ask a running (duo-)vLLM server one question and stream the answer to stdout.

    duo-chat --base-url http://127.0.0.1:8000/v1 "What is the capital of France?"
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "duo-chat"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Chat with an OpenAI-compatible (vLLM) server, streaming.")
    p.add_argument("question", help="the user message")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                   help="server API root (env OPENAI_BASE_URL)")
    p.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
                   help="the server's --api-key (env OPENAI_API_KEY)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    return p


def chat(client, model: str, messages: list[dict], max_tokens: int, temperature: float, out=sys.stdout) -> str:
    """Stream one chat completion to `out`; returns the full answer."""
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
    )
    parts: list[str] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            out.write(parts[-1])
            out.flush()
    out.write("\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}
    ]
    try:
        model = args.model or client.models.list().data[0].id
        answer = chat(client, model, messages, args.max_tokens, args.temperature)
    except openai.APIConnectionError:
        print(f"{PROG}: error: cannot reach {args.base_url} (is the server up?)", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        print(f"{PROG}: error: server answered {e.status_code}: {e.message}", file=sys.stderr)
        return 1
    if not answer.strip():
        print(f"{PROG}: the model ended its turn without any text. Heavily sparsified small models do this "
              "(SmolLM2-135M at W50+X50 often does); try a lower sparsity or --temperature 0.7.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
