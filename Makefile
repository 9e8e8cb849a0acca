# The two front-door commands: `make cluster` and `make test`.
# Each first installs the system packages it needs (scripts/system-deps:
# with apt when it can, else it stops and prints the one command to run),
# then creates the virtualenv in .venv and installs skynet into it:
# `make cluster` the runtime only, `make test` with the test extra,
# `make lint` with the dev extra, `make setup` with both.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
export PYTHON

.PHONY: setup cluster test lint system-deps-cluster system-deps-test bench bench-peers \
	bench-compare chaos chaos-sigstop bench-discovery fuzz clean

# Pyro5 and gRPC-Python, the peers of the RPC comparison, in an environment of
# their own (never dependencies of skynet).
PEERS := benchmarks/.venv/.skynet-peers

# An editable install: a plain .pth line naming this checkout (see
# pyproject.toml), so the twistd plugin scan sees twisted/plugins here.
$(BIN)/.skynet-runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.skynet-test: $(BIN)/.skynet-runtime
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(BIN)/.skynet-dev: $(BIN)/.skynet-runtime
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

system-deps-cluster:
	scripts/system-deps cluster

system-deps-test:
	scripts/system-deps test

setup: $(BIN)/.skynet-test $(BIN)/.skynet-dev

$(PEERS): $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.compare --setup-peers
	touch $@

cluster: system-deps-cluster
	$(MAKE) --no-print-directory $(BIN)/.skynet-runtime
	$(BIN)/python -m examples.local_cluster

test: system-deps-test
	$(MAKE) --no-print-directory $(BIN)/.skynet-test $(PEERS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(BIN)/.skynet-dev
	$(BIN)/ruff check skynet tests examples benchmarks
	$(BIN)/ruff format --check skynet tests examples benchmarks
	$(BIN)/mypy skynet

bench: $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.rpc

bench-peers: $(PEERS)

bench-compare: $(BIN)/.skynet-runtime $(PEERS)
	$(BIN)/python -m benchmarks.compare

chaos: system-deps-test $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.chaos --backends embedded,zookeeper

chaos-sigstop: system-deps-test $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.chaos --sigstop --backends embedded,zookeeper

bench-discovery: system-deps-test $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.discovery --backends embedded,zookeeper

# A long structured fuzz of a real service (tests/test_fuzz.py): prints cases
# per second and findings; FUZZ_CASES=N for a longer or shorter run.
FUZZ_CASES ?= 20000
fuzz: setup
	$(BIN)/python -m tests.test_fuzz --cases $(FUZZ_CASES)

clean:
	rm -rf $(VENV) benchmarks/.venv build *.egg-info

# How fast the cluster heals (issue 16, docs/cluster.md): host deaths, leader
# deaths and a rolling upgrade of 10 on three loopback daemons, embedded and
# ZooKeeper; HEAL_ARGS="--rounds 2" for a shorter run.
.PHONY: bench-heal cluster-multi
HEAL_ARGS ?=
bench-heal: system-deps-test $(BIN)/.skynet-runtime
	$(BIN)/python -m benchmarks.heal $(HEAL_ARGS)

# Three daemons on 127.0.0.2-4 with examples/cluster.toml applied, a host
# killed and healed (README, "Self-healing cluster").
cluster-multi: system-deps-cluster
	$(MAKE) --no-print-directory $(BIN)/.skynet-runtime
	$(BIN)/python -m examples.cluster_multi
