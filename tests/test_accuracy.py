"""Zero-shot task data, lm-eval templates, `duo-eval zeroshot`, and a quick run of benchmarks/accuracy.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")

from duo_vllm.evaluate import zeroshot  # noqa: E402
from duo_vllm.evaluate.cli import main as duo_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# documents in the split lm-eval scores for each task (validation, or test for ARC and OpenBookQA)
SPLIT_SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
               "boolq": 3270, "openbookqa": 500, "rte": 277, "lambada": 5153, "sciq": 1000}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return zeroshot.build_task_dir(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def lm_eval_tasks(task_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return manager.load([zeroshot.TASK_PREFIX + t for t in zeroshot.TASKS])["tasks"]


def test_every_task_has_its_full_split(task_dir):
    for task, size in SPLIT_SIZES.items():
        lines = (task_dir / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == size, task
        assert len({line for line in lines}) > 0.99 * size, f"{task}: duplicated documents"


def test_lm_eval_renders_our_data_with_its_own_templates(lm_eval_tasks):
    def first(task: str):
        t = lm_eval_tasks[zeroshot.TASK_PREFIX + task]
        docs = t.test_docs() if t.has_test_docs() else t.validation_docs()
        assert len(docs) == SPLIT_SIZES[task], task
        doc = docs[0]
        return t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)

    text, choices, target = first("arc_easy")
    assert text == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert choices[target] == "Sunlight is the source of energy for nearly all ecosystems."
    text, choices, target = first("openbookqa")
    assert text.startswith("A person wants to start saving money") and choices[target] == "quit eating lunch out"
    text, choices, target = first("piqa")
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and target == 0
    # lm-eval's own HellaSwag preprocessing (activity label prefix, capitalised ctx_b)
    text, choices, target = first("hellaswag")
    assert text == "Roof shingle removal: A man is sitting on a roof. He" and len(choices) == 4 and target == 3
    text, choices, target = first("boolq")
    assert text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert choices == ["no", "yes"] and target == 0
    text, choices, target = first("rte")
    assert text.endswith("Christopher Reeve had an accident. True or False?\nAnswer:") and choices[target] == "False"
    # lm-eval scores WinoGrande by partial evaluation: the choices are the two contexts
    text, choices, target = first("winogrande")
    assert choices[text].endswith("so Maria") and target == "always got the easier cases."
    _, choices, target = first("arc_challenge")
    assert 0 <= target < len(choices)
    text, choices, target = first("sciq")
    assert text.endswith("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:")
    assert choices[target] == "darwin"
    # LAMBADA: the passage without its last word, which is the target
    t = lm_eval_tasks[zeroshot.TASK_PREFIX + "lambada"]
    doc = t.test_docs()[0]
    assert t.doc_to_text(doc).endswith("his mouth curved in a confident grin, I don't care about")
    assert t.doc_to_target(doc) == " signs"


def test_unknown_task_and_bad_backend_are_one_line_errors(smollm2_dir, capsys):
    with pytest.raises(zeroshot.TaskDataError, match="unknown task 'squad'"):
        zeroshot.task_docs("squad")
    assert duo_eval(["zeroshot", str(smollm2_dir), "--backend", "server"]) == 2
    assert "--backend server needs --base-url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        duo_eval(["zeroshot", str(smollm2_dir), "--tasks", "squad"])
    assert e.value.code == 2


@pytest.mark.slow
def test_accuracy_sweep_quick_run(tmp_path):
    """benchmarks/accuracy.py end to end at a tiny size: dense + DuoGPT W50+X50, 2 documents per task."""
    pytest.importorskip("vllm")
    out = tmp_path / "accuracy.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--methods", "duogpt", "--levels", "W0+X0",
           "W50+X50", "--nsamples", "2", "--seqlen", "128", "--limit", "2", "--ppl-tokens", "1024",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cell = result["cells"]["duogpt"]["W50+X50"]
    for scored in (result["dense"], cell):
        assert set(scored["zeroshot"]) == set(zeroshot.TASKS)
        accs = [s["acc"] for s in scored["zeroshot"].values()]
        assert all(s["n"] == 2 for s in scored["zeroshot"].values())
        assert all(sum(s["documents"]) / 2 == s[s["metric"]] for s in scored["zeroshot"].values())
        assert all(a in (0.0, 0.5, 1.0) for a in accs)
        assert scored["mean_acc"] == pytest.approx(sum(accs) / len(accs))
        assert all(1 < v < 1e5 for v in scored["perplexity"].values())
    # pruning half the weights and half the activations of a 135M model costs perplexity
    assert cell["perplexity"]["local:wiki"] > result["dense"]["perplexity"]["local:wiki"]
    # against the dense model's own distributions: the dense model agrees with itself, the pruned one less
    assert result["dense"]["top1"]["local:wiki"] == 1.0 and abs(result["dense"]["kl"]["local:wiki"]) < 1e-3
    assert cell["kl"]["local:wiki"] > 0.05 and cell["top1"]["local:wiki"] < 0.95
    dense_check, duo_check = result["reference_check"]["dense"], result["reference_check"]["duogpt:W50+X50"]
    for check, scored in ((dense_check, result["dense"]), (duo_check, cell)):
        assert set(check["tasks"]) == set(zeroshot.TASKS)
        assert all(check["tasks"][t]["vllm"] == scored["zeroshot"][t]["acc"] for t in zeroshot.TASKS)
        assert all(0 <= c["flips"] <= 2 and 0 <= c["median_dloglik"] <= c["max_dloglik"] < 1e3
                   for c in check["tasks"].values())
        assert all("choice_loglik" not in s for s in scored["zeroshot"].values())  # the stored cells drop them
    # the dense model: the served path and the reference agree to rounding on every choice of every document
    assert all(c["flips"] == 0 and c["max_dloglik"] < 1e-3 for c in dense_check["tasks"].values())
    # At W50+X50 no document-level bound holds: the thresholded model is discontinuous, and this checkpoint
    # (256 calibration tokens) amplifies a last-bit difference into whole nats on some documents. Measured
    # 2026-12-04 (AMD EPYC, 2 threads): vLLM against the reference up to 6.5 nats, 4 of 20 decisions differing;
    # the reference against itself at batch size 1 instead of 16, up to 4.2 nats.
    md = out.with_suffix(".md").read_text()
    assert "| duogpt |" in md and "| dense model |" in md and "W50+X50" in md and "tasks with signal" in md
    assert "| dense | " in md and "| duogpt:W50+X50 | " in md  # the reference check table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
