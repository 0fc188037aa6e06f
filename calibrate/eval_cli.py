"""duo-eval: evaluate a duo checkpoint (thresholds applied) or a dense model."""
from __future__ import annotations

import argparse
import json
import sys

from calibrate import data, evaluate, models
from duo_vllm.format import DuoFormatError

PROG = "duo-eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a duo checkpoint or a dense LLaMA model.")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="held-out perplexity, activation thresholds applied",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ppl.add_argument("model", help="duo checkpoint or plain model directory")
    ppl.add_argument("--text", default=None, help="local text file to score (default: the --dataset)")
    ppl.add_argument("--dataset", default=data.DEFAULT_EVALUATION, help="held-out text: local:wiki, file:PATH, ...")
    ppl.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    dataset = f"file:{args.text}" if args.text else args.dataset
    try:
        models.check_model_dir(args.model)
        result = evaluate.evaluate_perplexity(args.model, dataset, args.seqlen, args.max_tokens, progress=not args.json)
    except (models.ModelError, data.DataError, DuoFormatError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        kind = "duo checkpoint" if result["duo"] else "dense model"
        print(f"{result['model']} ({kind}): perplexity {result['perplexity']:.3f} on {result['dataset']} "
              f"({result['tokens']} tokens, seqlen {result['seqlen']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
