# Two set-up commands: `make demo` and `make test`. Each creates or reuses .venv.
# `make test` is the whole suite (CI runs it); `make test-fast` leaves out the slow tier (tests/conftest.py).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PRECOMPUTE_HOME ?= $(CURDIR)/var
export DAGSTER_HOME ?= $(PRECOMPUTE_HOME)/dagster_home

.PHONY: demo test test-fast ui clean services

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The demo writes $(DAGSTER_HOME)/dagster.yaml with telemetry off (pipelines/local.py). Paths are quoted:
# a project folder may have a space in its path.
demo: $(STAMP)
	mkdir -p "$(DAGSTER_HOME)"
	"$(PY)" -m pipelines.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Between commits: everything but the slow tier (training on real photos for minutes, the production
# stack, the browser, the Dask drills, the notebook, make demo); the import contract included.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# dagster dev on 127.0.0.1:3000, MLflow UI on 127.0.0.1:5000 (DAGSTER_PORT, MLFLOW_PORT); Ctrl-C stops both.
ui: $(STAMP)
	@VENV="$(VENV)" bash scripts/ui.sh

# PostgreSQL, moto's S3 server and an MLflow server (PostgreSQL + S3) on 127.0.0.1, free ports; prints
# the settings to export in another shell (tests/services.py). Ctrl-C stops them.
services: $(STAMP)
	"$(PY)" -m tests.services

clean:
	rm -rf var
