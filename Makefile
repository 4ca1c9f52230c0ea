# Two entry points: `make demo` and `make test`. Both build .venv on first use: the demo
# installs what it runs (the daemon and collector extras), the tests add the test stack.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c requirements/ci-constraints.txt

.PHONY: demo test lint bench-daemon bench-collector gpu-wheels clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.installed-demo: $(VENV)/.created pyproject.toml requirements/ci-constraints.txt
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml requirements/ci-constraints.txt
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(VENV)/bin/esper-telemetry demo

# ruff first: a style or lint finding fails the run before the slow tests start.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	bash tools/ensure-prometheus.sh
	bash tools/ensure-tmux.sh
	bash tools/ensure-chromium.sh
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

bench-daemon: $(VENV)/.installed
	$(PY) bench/daemon_ingest.py

bench-collector: $(VENV)/.installed
	$(PY) bench/collector_overhead.py

# What tools/gpu-check.sh installs on a lent GPU machine: this package's wheel here, the
# wheels that machine lacks from ../shared/tools/gpu-wheels.sh (pyzmq, pytest-asyncio).
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w .whl .

clean:
	rm -rf $(VENV) build *.egg-info
