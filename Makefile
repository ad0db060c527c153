# genrec-edge — every target is safe to re-run.
#   make demo        build the default database and recommend for user 42 (installs first)
#   make test        the test suite CI runs (installs first)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llama.cpp is compiled from source by llama-cpp-python's sdist (20–35 min on 2 cores, once): keep the CPU
# backend at -march=native and skip everything we do not use. pip caches the built wheel, so every later
# install takes seconds.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
STAMP := $(VENV)/.installed
LEVELS ?= F16,Q8_0,Q6_K,Q5_K_M,Q5_0,Q4_K_M,Q4_0,Q3_K_M,Q2_K
FULL ?= 0
export OMP_WAIT_POLICY ?= passive

.PHONY: install demo test test-slow bench lint clean

## install: venv; torch==2.13.0 (CPU) first; llama-cpp-python; the package with train/bench/dev extras
install: $(STAMP)
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/pip install -q -e ".[train,bench,dev]"
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
	$(BIN)/python -m bench.run --levels $(LEVELS) $(if $(USERS),--users $(USERS),) $(if $(filter 1,$(FULL)),--full,)

## lint: ruff
lint: install
	$(BIN)/ruff check genrec_edge convert bench tests

clean:
	rm -rf build dist *.egg-info .pytest_cache
