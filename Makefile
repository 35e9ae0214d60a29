# Two entry points for a fresh clone: `make demo` (the main job, offline) and `make test`.
# Each creates .venv and installs what it needs; torch is pinned to the CPU build *first* so
# that no resolver ever pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q "torch==2.13.0"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/subfit-fx demo

test: $(STAMP)
	$(PY) -m pytest -x -p no:cacheprovider -n 2 --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check subfit_fx tests examples benchmarks
