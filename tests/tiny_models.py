"""Small randomly initialised checkpoints of the supported LLaMA-layout families, for the family tests.

They carry the bundled SmolLM2 tokenizer (49152 tokens) and are written the way a user's model arrives:
a Hugging Face directory, or a float32 GGUF file laid out as llama.cpp's converter writes one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from duo_vllm.calibrate.models import load_tokenizer, smollm2_gguf

# head_dim 64 (vLLM's CPU attention serves it), GQA with 2 KV heads, two blocks
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
# shorter than the test prompts (a chat template with its system prompt, ~35 tokens) plus their
# continuations, so windowed attention is exercised in calibration, the reference and vLLM
SLIDING_WINDOW = 16
FAMILIES = {
    # Qwen2: q/k/v biases, tied embeddings (as in Qwen2-0.5B); Mistral: untied, a sliding window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=SLIDING_WINDOW)),
}
BIAS_STD = 0.3  # comparable to the q/k/v outputs of a random model: large enough to change every result


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised float32 model of `family` ("qwen2" or "mistral")."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    tok = load_tokenizer(smollm2_dir())
    config = getattr(transformers, config_cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id, dtype="float32", **SHAPE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # transformers initialises biases to zero
                p.normal_(0.0, BIAS_STD)
    return model, tok


def smollm2_dir() -> Path:
    from duo_vllm.calibrate.models import prepare_test_model

    return prepare_test_model()


def write_hf(family: str, out: Path) -> Path:
    model, tok = tiny_model(family)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for llama-type GGUFs (transformers' loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(family: str, path: Path) -> Path:
    """The tiny model as a float32 GGUF with the SmolLM2 GGUF's tokenizer metadata."""
    import gguf

    model, _ = tiny_model(family)
    cfg = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "mistral": gguf.MODEL_ARCH.LLAMA}[family]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    source = gguf.GGUFReader(str(smollm2_gguf()))
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = _permute_for_gguf(t, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
