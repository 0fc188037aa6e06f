"""Evaluation of dense models and duo checkpoints (installed as ``duo_vllm.evaluate``): held-out perplexity
through the offline reference (perplexity.py), zero-shot tasks scored by lm-eval through vLLM, a running
server or the reference (zeroshot.py), and the ``duo-eval`` CLI (cli.py)."""
