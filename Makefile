# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo

.PHONY: venv demo test test-fast lint bench audit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

# The main job on the bundled sample lifelog: sample -> manifest -> extract -> classify -> finetune -> predict
# (the sample's held-out days) -> report; then the data-availability curve of both approaches, and the report again.
demo: $(STAMP)
	$(BIN)/lifelog-ray sample $(DEMO_DIR)/lifelog --held-out $(DEMO_DIR)/new-days
	$(BIN)/lifelog-ray run --config jobs/configs/sample.yaml
	$(BIN)/lifelog-ray curve --config jobs/configs/sample.yaml
	$(BIN)/lifelog-ray report --config jobs/configs/sample.yaml

lint: $(STAMP)
	$(BIN)/ruff check lifelog_ray tests jobs benchmarks

# The full suite (what CI runs), in two pytest runs that together run every test. First all but the cluster
# tail, on two pytest-xdist workers (one at a time, a test often keeps one core busy while the other waits);
# then the tests that start their own Ray cluster, one at a time and alone: the README recipe's head needs Ray's
# default ports, which the workers' Rays hold, and the autoscaling cluster's heartbeats and idle timeouts want
# the cores to themselves (beside each other the two took as long as one after the other). tests/README.md has
# the why and the budgets. Each run closes with its 25 slowest tests, so each CI log shows where the time goes.
XDIST := -n 2 --dist loadgroup --no-loadscope-reorder
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra --durations=25 $(XDIST) -m "not cluster" tests
	$(BIN)/python -m pytest -q -ra --durations=25 -m "cluster" tests

# The edit loop: unit tests with no Ray, subprocess or S3 server (under a minute on 2 cores).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -ra $(XDIST) -m "not integration and not slow" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/classify.py
	$(BIN)/python benchmarks/finetune.py --epochs 3
	$(BIN)/python benchmarks/storage.py

# Known vulnerabilities in the installed dependencies (asks PyPI's advisory data; needs the network).
audit: $(STAMP)
	$(BIN)/pip-audit --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
