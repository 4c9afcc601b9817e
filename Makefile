# gridmesh: the two commands a newcomer needs are `make test` and `make devnet`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test fuzz devnet lint bench clean deps wheel-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,shards]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Test files run in parallel, one worker per core here (a file's tests stay together, so
# its module fixtures are built once); TEST_WORKERS=0 runs them in this process, in order.
# The slowest tests are listed at the end: where the suite's minutes go, for whoever speeds it.
TEST_WORKERS ?= 2

test: $(STAMP) lint contracts-deps dashboard-deps
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20

# the pinned Solidity toolchain (solc-js, OpenZeppelin, anvil) for the contract tests; never
# needed by the daemon at run time. npm ci empties node_modules, so the stamp lives inside it.
CONTRACTS_STAMP := contracts/node_modules/.installed
.PHONY: contracts-deps
contracts-deps: $(CONTRACTS_STAMP)
$(CONTRACTS_STAMP): contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund
	touch $(CONTRACTS_STAMP)

# axe-core (pinned by its lock file) for the dashboard's accessibility check in Chromium
DASHBOARD_STAMP := tests/daemon/dashboard/node_modules/.installed
.PHONY: dashboard-deps
dashboard-deps: $(DASHBOARD_STAMP)
$(DASHBOARD_STAMP): tests/daemon/dashboard/package-lock.json
	cd tests/daemon/dashboard && npm ci --no-audit --no-fund
	touch $(DASHBOARD_STAMP)

# the property tests with fresh random examples, many more of them (see tests/conftest.py)
fuzz: $(STAMP)
	GRIDMESH_HYPOTHESIS=explore $(BIN)/pytest -q -m 'not procs' \
		$$(grep -rl '^from hypothesis' tests --include='test_*.py')

devnet: $(STAMP)
	$(BIN)/python -m daemon.devnet

bench: $(STAMP)
	$(BIN)/python bench/p2p.py
	$(BIN)/python bench/registry_daemons.py
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/registry_sync.py
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/abuse.py
	$(BIN)/python bench/chain.py
	$(BIN)/python bench/swim.py
	$(BIN)/python bench/election_nemesis.py
	$(BIN)/python bench/cluster.py --procs 5

# the import check: no import circle, DESIGN.md's layering, no production use of the testing kit
deps: $(STAMP)
	$(BIN)/python -m daemon.tools.deps --strict

# build the wheel, install it in a fresh venv outside the checkout, run init, a daemon start and
# stop, and model make-tiny from it (.ci/wheel_check.py says how torch is not installed twice)
wheel-check: $(STAMP)
	$(BIN)/python .ci/wheel_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
