# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv once.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch and torchvision first: the pinned builds lie on local disk; anything else pulls gigabytes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

# Token authentication is disabled for the pytest process only (the tests' own local clusters,
# tests/conftest.py does the same); `make demo` keeps Ray's default: its local Ray generates a token.
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q --durations=15 tests

bench: $(STAMP)
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/preprocess.py --years 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
