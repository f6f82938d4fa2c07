# ovss developer entry points. `make demo` and `make test` work on a fresh clone:
# they create .venv in the checkout and install everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ovss-installed
# On our machines the package index caps torch at 2.14.1 / torchvision 0.29.1 (a matching pair).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-gpu lint format clean help browser compiler

help:
	@echo "make install  create .venv and install ovss with its test dependencies"
	@echo "make demo     run 'ovss demo' (the embedded default benchmark)"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks (table on stdout, JSON in bench_out/)"
	@echo "make bench-gpu  GPU figures in <= 5 min on one GPU + the CPU bench's ratios"
	@echo "make lint     ruff check + format check"

install: $(STAMP)

$(STAMP): setup.cfg Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS) --config-settings editable_mode=compat
	touch $(STAMP)

demo: install compiler
	$(BIN)/ovss demo

# The scoring kernel (methods/native/*.c) is compiled on first use by the system C compiler;
# without one the same labels come from the slower torch path. Installed with apt when missing
# and apt can run.
compiler:
	@if command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1; then \
		true; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "no C compiler and no apt-get: scoring runs its slower torch path"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev) \
			|| echo "gcc could not be installed: scoring runs its slower torch path"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		(sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq gcc libc6-dev) \
			|| echo "gcc could not be installed: scoring runs its slower torch path"; \
	else \
		echo "no C compiler and no root or sudo for apt: scoring runs its slower torch path"; \
	fi

# The report test drives a real headless Chromium: installed with apt when missing and apt can
# run (as root, or through password-less sudo); elsewhere that test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		true; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "no chromium and no apt-get: the browser test of the report will be skipped"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "chromium could not be installed: the browser test will be skipped"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		(sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium) \
			|| echo "chromium could not be installed: the browser test will be skipped"; \
	else \
		echo "no chromium and no root or sudo for apt: the browser test will be skipped"; \
	fi

test: install browser compiler
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

bench: install compiler
	$(BIN)/python -m benchmarks.run

# Refuses (exit 2, one line) without CUDA; `python -m benchmarks.gpu_check --smoke` is the CPU
# dry run of the same code path.
bench-gpu: install
	$(BIN)/python -m benchmarks.gpu_check

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info demo_out bench_out .pytest_cache .ruff_cache
