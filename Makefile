# Every target sets itself up: `make demo` and `make test` work on a fresh machine with only python3 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test test-slow test-gpu quality style bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 tests -m "not slow and not gpu and not multi_gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 tests -m "slow and not gpu and not multi_gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest tests -m "gpu"

quality: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

style: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
