"""Serving a duo checkpoint with vLLM (installed as ``duo_vllm.serve``): ``duo-serve``, ``duo-chat``, the engine
settings per platform, the server process helper and ``make demo``'s end."""
