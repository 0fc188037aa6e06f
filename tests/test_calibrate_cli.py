"""duo-calibrate / duo-eval on bad input: one clear message, exit status 2, nothing written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duo_vllm.calibrate import cli
from duo_vllm.evaluate import cli as eval_cli


def run_cli(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(f"{out.name}.resume").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp dir left behind"


def test_missing_model_dir(tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "not a directory" in err and "nope" in err
    assert_nothing_written(out)


def test_invalid_model_dir(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out)], capsys)
    assert code == 2 and "no config.json" in err
    (model / "config.json").write_text("{not json")
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out)], capsys)
    assert code == 2 and "not valid JSON" in err and "config.json" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("arch,model_type", [("GPT2LMHeadModel", "gpt2"), ("GemmaForCausalLM", "gemma")])
def test_unsupported_architecture(tmp_path, capsys, arch, model_type):
    model = tmp_path / model_type
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out)], capsys)
    supported = "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    assert code == 2 and arch in err and supported in err and "config.json" in err
    assert_nothing_written(out)
    code, err = run_cli(cli.main, ["prepare-model", str(model), "--out", str(out)], capsys)
    assert code == 2 and arch in err and supported in err
    assert_nothing_written(out)


def test_qwen2_with_mixed_attention_types_is_refused(tmp_path, capsys):
    model = tmp_path / "qwen2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
        "layer_types": ["full_attention", "sliding_attention"]}))
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(tmp_path / "ckpt")], capsys)
    assert code == 2 and "mix attention types" in err


def test_weights_that_disagree_with_the_config_are_refused(tmp_path, capsys):
    import transformers

    model = tmp_path / "model"
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(model, safe_serialization=True)
    raw = json.loads((model / "config.json").read_text())
    out = tmp_path / "ckpt"
    # transformers would load these with random values for the missing layer, or for the q/k/v biases
    for change, message in (({"num_hidden_layers": 3}, "no *.safetensors file holds model.layers.2."),
                            ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
                             "holds model.layers.0.self_attn.q_proj.bias")):
        (model / "config.json").write_text(json.dumps({**raw, **change}))
        code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out)], capsys)
        assert code == 2 and message in err and "config.json" in err, err
        assert_nothing_written(out)
    # pickled weights only: never unpickled
    (model / "config.json").write_text(json.dumps(raw))
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out)], capsys)
    assert code == 2 and "only pickled *.bin files, which are never loaded" in err, err


@pytest.mark.parametrize("flag,value", [("--weight-sparsity", "1.0"), ("--act-sparsity", "-0.1"),
                                        ("--weight-sparsity", "abc")])
def test_sparsity_out_of_range(tmp_path, capsys, flag, value):
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(tmp_path), "--out", str(out), flag, value], capsys)
    assert code == 2 and flag in err
    assert_nothing_written(out)


def test_flags_follow_the_config_schema():
    """One flag per calibration field of DuoConfig, with its default, choices and description."""
    from duo_vllm.format import DuoConfig

    p = cli.build_parser()
    flags = {a.dest: a for a in p._actions}
    for name, field in DuoConfig.model_fields.items():
        if name in ("quant_method", "format_version"):
            assert name not in flags
            continue
        assert flags[name].option_strings == ["--" + name.replace("_", "-")]
        assert field.description and field.description in flags[name].help
        if name != "weight_sparsity":
            assert flags[name].default == field.default
    assert flags["method"].choices == ["duogpt", "sparsegpt", "wanda", "magnitude", "teal", "dense"]
    args = p.parse_args(["--model", "m", "--out", "o", "--method", "teal"])
    assert cli.config_from_args(p, args).weight_sparsity == 0.0  # teal prunes nothing
    args = p.parse_args(["--model", "m", "--out", "o"])
    assert cli.config_from_args(p, args) == DuoConfig()


def test_old_method_name_is_read_with_a_warning(capsys):
    p = cli.build_parser()
    cfg = cli.config_from_args(p, p.parse_args(["--model", "m", "--out", "o", "--method", "dense",
                                                "--input-stream", "dense"]))
    assert (cfg.method, cfg.weight_sparsity, cfg.input_stream) == ("teal", 0.0, "original")
    err = capsys.readouterr().err
    assert "warning: method 'dense' is now called 'teal'" in err
    assert "warning: input_stream 'dense' is now called 'original'" in err


def test_teal_with_weight_sparsity_is_refused(tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(tmp_path), "--out", str(out), "--method", "teal",
                                   "--weight-sparsity", "0.5"], capsys)
    assert code == 2 and "method 'teal' keeps every weight: weight_sparsity must be 0, not 0.5" in err
    assert_nothing_written(out)


def test_empty_and_short_dataset(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    code, err = run_cli(cli.main, ["--model", str(smollm2_dir), "--out", str(out), "--dataset", f"file:{empty}"], capsys)
    assert code == 2 and "no text" in err and str(empty) in err
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    code, err = run_cli(cli.main, ["--model", str(smollm2_dir), "--out", str(out), "--dataset", f"file:{short}",
                                   "--seqlen", "2048"], capsys)
    assert code == 2 and "too short for --seqlen 2048" in err
    code, err = run_cli(cli.main, ["--model", str(smollm2_dir), "--out", str(out), "--dataset", "local:nope"], capsys)
    assert code == 2 and "local:nope" in err and "local:c4" in err
    assert_nothing_written(out)


def test_existing_out_refused(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(cli.main, ["--model", str(smollm2_dir), "--out", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_eval_bad_input(tmp_path, capsys):
    code, err = run_cli(eval_cli.main, ["perplexity", str(tmp_path / "nope")], capsys)
    assert code == 2 and "not a directory" in err


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point: a one-line error on stderr, no Python traceback."""
    proc = subprocess.run([sys.executable, "-m", "duo_vllm.calibrate.cli", "--model", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("duo-calibrate: error:") and "Traceback" not in proc.stderr


def test_shaped_model_needs_out(capsys):
    code, err = run_cli(cli.main, ["prepare-model", "--shape", "llama2-7b"], capsys)
    assert code == 2 and "--shape llama2-7b needs --out DIR" in err
    code, err = run_cli(cli.main, ["prepare-model", "model.gguf"], capsys)
    assert code == 2 and "SOURCE model.gguf needs --out DIR" in err


def test_shaped_model_never_replaces_a_directory(tmp_path, capsys):
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    code, err = run_cli(cli.main, ["prepare-model", "--shape", "llama2-7b", "--layers", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "already exists" in err and str(tmp_path) in err
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.down_proj.weight", "model.layers.0.post_attention_layernorm.weight"])
def test_nan_in_the_input_model_is_named_and_nothing_written(tmp_path, capsys, tensor):
    import tiny_models
    from safetensors.torch import load_file, save_file

    model = tiny_models.write_hf("mistral", tmp_path / "model")
    weights = load_file(str(model / "model.safetensors"))
    weights[tensor].view(-1)[0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "ckpt"
    code, err = run_cli(cli.main, ["--model", str(model), "--out", str(out), "--nsamples", "2", "--seqlen", "64"],
                        capsys)
    # a NaN norm weight shows first in the inputs of the next group (mlp.gate_proj of block 0)
    where = tensor if "down_proj" in tensor else "model.layers.0.mlp.gate_proj: NaN/inf in its calibration inputs"
    assert code == 2 and where in err, err
    if "layers.1" in tensor:  # block 0 finished: kept for --resume, and the message says so
        assert "[kept for --resume: 1 finished block(s) in" in err, err
        shutil.rmtree(out.with_name("ckpt.resume"))
    assert_nothing_written(out)


def test_out_of_memory_names_the_block_and_linear(smollm2_dir, tmp_path):
    """A real allocation failure: the process's address space is capped 2 GiB above what the imports map, below
    down_proj's 4 GiB Hessian."""
    import transformers

    from duo_vllm.calibrate.models import load_tokenizer

    model = tmp_path / "wide"
    tok = load_tokenizer(smollm2_dir)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=32768, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=len(tok))
    transformers.LlamaForCausalLM(config).save_pretrained(model, safe_serialization=True)
    tok.save_pretrained(model)
    out = tmp_path / "ckpt"
    script = (
        "import resource, sys\n"
        "from duo_vllm.calibrate import cli\n"
        "from transformers import AutoTokenizer, LlamaForCausalLM  # imported before the cap\n"
        "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30),) * 2)\n"
        f"sys.exit(cli.main(['--model', {str(model)!r}, '--out', {str(out)!r}, '--nsamples', '2', '--seqlen', '32']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert err.startswith("duo-calibrate: error: model.layers.0.mlp.down_proj: out of memory on cpu"), err
    assert "fewer --nsamples or a shorter --seqlen" in err and "Traceback" not in proc.stderr
    assert_nothing_written(out)


def test_kill_9_leaves_no_checkpoint_and_the_next_run_cleans_up(tmp_path, capsys):
    import signal
    import time

    import tiny_models

    model = tiny_models.write_hf("qwen2", tmp_path / "model")
    out = tmp_path / "ckpt"
    argv = [sys.executable, "-m", "duo_vllm.calibrate.cli", "--model", str(model), "--out", str(out),
            "--nsamples", "4", "--seqlen", "128"]
    temporaries = lambda: list(tmp_path.glob(".ckpt.tmp-*"))  # noqa: E731
    # killed while calibrating, then killed while writing the checkpoint directory
    for moment in ("calibrating", "writing"):
        proc = subprocess.Popen(argv + ["--resume"] * (moment == "writing"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        if moment == "calibrating":  # the progress bar has started
            seen = ""
            while "calibrating" not in seen and time.time() < deadline:
                chunk = proc.stderr.read(16)
                if not chunk:
                    break
                seen += chunk
        else:
            while not temporaries() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{moment}: the run ended before it was killed"
        assert not out.exists(), moment
        assert len(temporaries()) == (0 if moment == "calibrating" else 1), moment
    # the next run removes what the killed writer left, and writes the checkpoint from the kept blocks
    code, err = run_cli(cli.main, argv[3:] + ["--resume"], capsys)
    assert code == 0, err
    assert (out / "config.json").is_file() and temporaries() == []
    assert json.loads((out / "duo_report.json").read_text())["resumed_blocks"] == 2
