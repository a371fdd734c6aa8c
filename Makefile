# dyco_probe: `make demo` runs the main job on the built-in model, `make test` runs the tests.
# Each target installs what it needs into .venv (torch's CPU wheel first, so pip never pulls CUDA builds).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,trl]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dyco_probe.demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check dyco_probe tests analyses benchmarks
	$(PY) -m ruff format --check dyco_probe tests analyses benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
