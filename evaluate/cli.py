"""duo-eval: evaluate a duo checkpoint (thresholds applied) or a dense model."""
from __future__ import annotations

import argparse
import json
import sys

from duo_vllm.calibrate import data, models
from duo_vllm.evaluate import perplexity, zeroshot
from duo_vllm.files import write_json_atomic
from duo_vllm.format import DuoFormatError

PROG = "duo-eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a duo checkpoint or a dense model (LLaMA, Mistral, Qwen2).")
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="held-out perplexity, activation thresholds applied",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ppl.add_argument("model", help="duo checkpoint or plain model directory")
    ppl.add_argument("--text", default=None, help="local text file to score (default: the --dataset)")
    ppl.add_argument("--dataset", default=data.DEFAULT_EVALUATION, help="held-out text: local:wiki, file:PATH, ...")
    ppl.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    zs = sub.add_parser("zeroshot", help=f"zero-shot accuracy with lm-evaluation-harness ({len(zeroshot.TASKS)} tasks, offline data)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description=zeroshot.__doc__.split("\n\n")[0])
    zs.add_argument("model", help="duo checkpoint or plain model directory (also the tokenizer)")
    zs.add_argument("--tasks", nargs="+", default=list(zeroshot.TASKS), choices=list(zeroshot.TASKS), metavar="TASK",
                    help=f"tasks to score ({', '.join(zeroshot.TASKS)})")
    zs.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    zs.add_argument("--backend", default="vllm", choices=zeroshot.BACKENDS,
                    help="vllm: in-process vLLM (quantization=duo); server: a running server at --base-url; "
                         "reference: the offline transformers reference")
    zs.add_argument("--base-url", default=None, help="with --backend server: e.g. http://127.0.0.1:8000/v1")
    zs.add_argument("--served-model-name", default=None, help="with --backend server: the server's model name")
    zs.add_argument("--task-dir", default=None, help="where the task jsonl/YAML files are built "
                                                      "(default ~/.cache/duo-vllm/lm_eval_tasks)")
    zs.add_argument("--json", action="store_true", help="print the result as JSON")
    for sp in (ppl, zs):
        sp.add_argument("--out", default=None, help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    try:
        models.check_model_dir(args.model)
        if args.command == "perplexity":
            dataset = f"file:{args.text}" if args.text else args.dataset
            result = perplexity.evaluate_perplexity(args.model, dataset, args.seqlen, args.max_tokens,
                                                  progress=not args.json)
        else:
            result = zeroshot.evaluate_zeroshot(args.model, args.tasks, args.limit, args.backend, args.task_dir,
                                                args.base_url, args.served_model_name)
    except (models.ModelError, data.DataError, DuoFormatError, zeroshot.TaskDataError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result))
    elif args.command == "perplexity":
        kind = "duo checkpoint" if result["duo"] else "dense model"
        print(f"{result['model']} ({kind}): perplexity {result['perplexity']:.3f} on {result['dataset']} "
              f"({result['tokens']} tokens, seqlen {result['seqlen']})")
    else:
        print(f"{'task':<15}{'n':>6}{'acc':>8}{'acc_norm':>10}")
        for task, s in result["tasks"].items():
            norm = f"{s['acc_norm']:.4f}" if "acc_norm" in s else "-"
            print(f"{task:<15}{s['n']:>6}{s['acc']:>8.4f}{norm:>10}")
        print(f"{'mean acc':<21}{result['mean_acc']:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
