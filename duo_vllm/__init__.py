"""duo-vllm: dual-sparse (pruned weights x thresholded activations) LLaMA serving in vLLM."""


def register() -> None:
    """vLLM general-plugin entry point: registers the 'duo' quantization method (idempotent, cheap)."""
    from duo_vllm import quant  # noqa: F401  (registration happens at import)
