# genrec-edge — every target is safe to re-run.
#   make demo        build the default database and recommend for user 42 (installs first)
#   make test        the test suite CI runs (installs first)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp is compiled from llama-cpp-python's sdist by scripts/llama_wheel.py (10-35 min on 2 cores, once),
# into ~/.cache/genrec-edge/llama-cpp/<version>-<key>/, key = hash of the flags, compiler, Python and what
# -march=native means on this CPU; pip's own wheel cache is never used for it (it ignores CMAKE_ARGS).
#   LLAMA_CPU=native    (default) -march=native: fastest here, built for this machine
#   LLAMA_CPU=portable  x86-64-v3 (AVX2/FMA/F16C), no build-machine detection: for images shared between CPUs
#   LLAMA_AMX=auto      (default) AMX in a native build only where a child process ran an AMX tile product and
#                       the installed build then passes a batched decode (else rebuilt without); 1 / 0: always / never
#   LLAMA_CMAKE_EXTRA   more CMake arguments (part of the key)
LLAMA_CPU ?= native
LLAMA_AMX ?= auto
LLAMA_CMAKE_EXTRA ?=
export LLAMA_CPU LLAMA_AMX LLAMA_CMAKE_EXTRA
STAMP := $(VENV)/.installed
LEVELS ?=# empty: every level (genrec_edge.quantize.LEVELS)
FULL ?= 0
export OMP_WAIT_POLICY ?= passive

.PHONY: install demo test test-slow bench lint clean help

## install: venv; torch==2.13.0 (CPU) first; llama-cpp-python built for this machine; the package + extras
# Where pip offers no CPU build of torch (plain PyPI has the CUDA one):
#   make install TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
# The llama step runs every time (under a second when the keyed wheel is installed): a flag or CPU change rebuilds.
install: $(STAMP)
	@$(BIN)/python scripts/llama_wheel.py --python $(BIN)/python
$(STAMP): pyproject.toml Makefile scripts/llama_wheel.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(BIN)/python scripts/llama_wheel.py --python $(BIN)/python
	$(BIN)/pip install -q -e ".[train,bench,dev,cluster]"
	touch $(STAMP)

## demo: the main job on the embedded default (ml-latest-small): init, then recommend for user 42
demo: install
	$(BIN)/genrec-edge init
	$(BIN)/genrec-edge recommend --user 42

## test: the fast suite (tiny random models, real SQLite and llama.cpp); what CI runs
test: install
	$(BIN)/pytest -q

## test-slow: checks on the real SmolLM2-135M model
test-slow: install
	$(BIN)/pytest -q -m slow

## bench: compare quantization levels (LEVELS=F16,Q8_0 to choose; USERS=N sampled users; FULL=1 for every test user)
bench: install
	$(BIN)/python -m bench.run $(if $(LEVELS),--levels $(LEVELS),) $(if $(USERS),--users $(USERS),) $(if $(filter 1,$(FULL)),--full,)

## lint: ruff
lint: install
	$(BIN)/ruff check genrec_edge convert bench tests scripts

## clean: build outputs and caches (not .venv, not GENREC_EDGE_HOME)
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

## help: this list (plain `make` is `make install`)
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)
