# airflow-glidein: `make demo` and `make test` work on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench soak soak-ci check-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## one provisioning cycle on the embedded EC2 emulator
	$(BIN)/python examples/demo.py

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## benchmarks with their goals (slow)
	$(BIN)/python bench/run_all.py

soak: $(STAMP)  ## the deployment as local processes under faults, about 20 minutes (needs haproxy, PostgreSQL binaries, Redis)
	$(BIN)/python -m tests.soak --minutes 20

soak-ci: $(STAMP)  ## the soak's short form that CI runs (under 10 minutes)
	$(BIN)/python -m tests.soak --minutes 3

check-config: $(STAMP)
	$(BIN)/python -m airflow_glidein check-config examples/glidein.yaml

clean:
	rm -rf $(VENV) .demo test-output build *.egg-info
