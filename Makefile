# The two front-door commands: `make cluster` and `make test`.
# Both create the virtualenv in .venv and install skynet into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup cluster test lint bench bench-peers bench-compare chaos chaos-sigstop bench-discovery fuzz clean

# Pyro5 and gRPC-Python, the peers of the RPC comparison, in an environment of
# their own (never dependencies of skynet).
PEERS := benchmarks/.venv/.skynet-peers

$(BIN)/.skynet-installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# compat mode: the twistd plugin scan must see twisted/plugins in this tree
	$(BIN)/python -m pip install -q -e '.[test,dev]' --config-settings editable_mode=compat
	touch $@

setup: $(BIN)/.skynet-installed

$(PEERS): $(BIN)/.skynet-installed
	$(BIN)/python -m benchmarks.compare --setup-peers
	touch $@

cluster: setup
	$(BIN)/python -m examples.local_cluster

test: setup $(PEERS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check skynet tests examples benchmarks
	$(BIN)/ruff format --check skynet tests examples benchmarks
	$(BIN)/mypy skynet

bench: setup
	$(BIN)/python -m benchmarks.rpc

bench-peers: $(PEERS)

bench-compare: setup $(PEERS)
	$(BIN)/python -m benchmarks.compare

chaos: setup
	$(BIN)/python -m benchmarks.chaos --backends embedded,zookeeper

chaos-sigstop: setup
	$(BIN)/python -m benchmarks.chaos --sigstop --backends embedded,zookeeper

bench-discovery: setup
	$(BIN)/python -m benchmarks.discovery --backends embedded,zookeeper

# A long structured fuzz of a real service (tests/test_fuzz.py): prints cases
# per second and findings; FUZZ_CASES=N for a longer or shorter run.
FUZZ_CASES ?= 20000
fuzz: setup
	$(BIN)/python -m tests.test_fuzz --cases $(FUZZ_CASES)

clean:
	rm -rf $(VENV) benchmarks/.venv build *.egg-info
