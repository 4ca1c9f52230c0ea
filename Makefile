# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench-daemon bench-collector gpu-wheels clean

$(VENV)/.installed: pyproject.toml requirements/ci-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/ci-constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/esper-telemetry demo

test: $(VENV)/.installed
	bash tools/ensure-prometheus.sh
	bash tools/ensure-tmux.sh
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
