"""duo-calibrate (installed as ``duo_vllm.calibrate``): DuoGPT and its baselines over a LLaMA-family model,
block by block (pipeline.py) and group by group (group.py, methods.py, solver.py), written as a duo checkpoint
through duo_vllm.format (api.py, cli.py)."""
