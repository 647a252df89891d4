# Everything the project needs is installed here: `make test` works on a machine with only
# Python 3.11+ and git.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test up lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check gitfaas bridge consumer tests bench
	$(BIN)/python -m pytest

up: $(STAMP)
	$(BIN)/gitfaas up --repo examples/pipeline

lint: $(STAMP)
	$(BIN)/ruff check gitfaas bridge consumer tests bench

clean:
	rm -rf $(VENV) .gitfaas .pytest_cache

# Issue #8: the five benchmarks, their tables, and bench/RESULTS.md (a few minutes; not part of `test`).
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m bench
