# The two front-door commands: `make cluster` and `make test`.
# Both create the virtualenv in .venv and install skynet into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup cluster test lint bench clean

$(BIN)/.skynet-installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# compat mode: the twistd plugin scan must see twisted/plugins in this tree
	$(BIN)/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	touch $@

setup: $(BIN)/.skynet-installed

cluster: setup
	$(BIN)/python -m examples.local_cluster

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check skynet tests examples benchmarks
	$(BIN)/ruff format --check skynet tests examples benchmarks
	$(BIN)/mypy skynet

bench: setup
	$(BIN)/python -m benchmarks.rpc

clean:
	rm -rf $(VENV) build *.egg-info
