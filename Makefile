# Two set-up commands: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PRECOMPUTE_HOME ?= $(CURDIR)/var
export DAGSTER_HOME ?= $(PRECOMPUTE_HOME)/dagster_home

.PHONY: demo test ui clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	$(PY) -m pipelines.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	@echo "Dagster UI: http://127.0.0.1:3000   MLflow UI: http://127.0.0.1:5000   (Ctrl-C stops both)"
	@trap 'kill -INT $$D $$M 2>/dev/null; wait' INT TERM; \
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml & D=$$!; \
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(PRECOMPUTE_HOME)/mlflow.db & M=$$!; \
	wait

clean:
	rm -rf var
