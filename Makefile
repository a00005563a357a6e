# airflow-glidein: `make demo` and `make test` work on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench check-config clean

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

check-config: $(STAMP)
	$(BIN)/python -m airflow_glidein check-config examples/glidein.yaml

clean:
	rm -rf $(VENV) .demo test-output build *.egg-info
