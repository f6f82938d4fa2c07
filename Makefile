# ovss developer entry points. `make demo` and `make test` work on a fresh clone:
# they create .venv in the checkout and install everything they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ovss-installed
# On our machines the package index caps torch at 2.14.1 / torchvision 0.29.1 (a matching pair).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test bench lint format clean help

help:
	@echo "make install  create .venv and install ovss with its test dependencies"
	@echo "make demo     run 'ovss demo' (the embedded default benchmark)"
	@echo "make test     run the test suite"
	@echo "make bench    run the benchmarks (table on stdout, JSON in bench_out/)"
	@echo "make lint     ruff check + format check"

install: $(STAMP)

$(STAMP): setup.cfg Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_PINS) --config-settings editable_mode=compat
	touch $(STAMP)

demo: install
	$(BIN)/ovss demo

test: install
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

bench: install
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info demo_out bench_out .pytest_cache .ruff_cache
