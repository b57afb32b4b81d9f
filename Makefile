# PocoFlow developer entry points. A fresh machine needs only Python >= 3.11 and make:
# every target below creates .venv on first use (CI runs `make test` on a fresh clone).

PYTHON ?= python3
VENV   ?= .venv
EXTRAS ?= dev,ui,flower
ARGS   ?=
# Test processes (pytest-xdist; 0 runs the suite in this process). Most tests wait on
# real workers and servers (two processes kept 2 cores only 64% busy), so three share
# 2 cores well: 501 s against 614 s for two; whole modules go to one process
# (--dist loadscope), so a module's cluster of workers starts once.
TEST_JOBS ?= 3

BIN   := $(VENV)/bin
# Touched after a successful install: the venv is re-synced only when pyproject.toml
# is newer, so `make test` costs nothing extra on the second run.
STAMP := $(VENV)/.pocoflow-installed
PIP_LOG := $(VENV)/pip-install.log

.DEFAULT_GOAL := help
.PHONY: help venv test e2e-deps chaos chaos-short demo bench lint fmt clean distclean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=$(EXTRAS) ARGS='pytest/bench args'"

venv: $(STAMP)  ## create .venv and install -e .[EXTRAS] (again only when pyproject.toml changed)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: PocoFlow needs Python >= 3.11, but PYTHON=$(PYTHON) is: $$($(PYTHON) -V 2>/dev/null || echo 'not found')" >&2; \
	  echo "       run e.g. 'make PYTHON=python3.11 $(MAKECMDGOALS)'" >&2; exit 1; }
	@echo "setup 1/2: creating $(VENV) with $$($(PYTHON) -V)"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
	@$(BIN)/python -m pip install --quiet --progress-bar off --upgrade pip > $(PIP_LOG) 2>&1 \
	  || { tail -20 $(PIP_LOG) >&2; echo "error: upgrading pip failed; full log: $(PIP_LOG)" >&2; exit 1; }

# Because a fresh clone's first screen should say what is happening, not be pip's log:
# one line per phase, pip's output in a file (shown in part only when it fails).
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "setup 2/2: installing pocoflow[$(EXTRAS)] and its dependencies (log: $(PIP_LOG))"
	@$(BIN)/python -m pip install --progress-bar off -e '.[$(EXTRAS)]' >> $(PIP_LOG) 2>&1 \
	  || { tail -30 $(PIP_LOG) >&2; echo "error: pip install failed; full log: $(PIP_LOG)" >&2; exit 1; }
	@touch $@
	@echo "setup done: $(VENV) is ready"

test: venv e2e-deps  ## run the test suite (ARGS="-k ledger -x" to narrow it)
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadscope --durations=20 $(ARGS)

e2e-deps:  ## best effort: Debian's chromium (+ emoji font) for tests/e2e, skipped without it
	@if [ -x /usr/bin/chromium ]; then /usr/bin/chromium --version; \
	elif command -v apt-get >/dev/null; then \
	  log="$$(mktemp)"; \
	  if apt-get install -y chromium fonts-noto-color-emoji >"$$log" 2>&1; then echo "chromium installed"; \
	  else tail -n 20 "$$log" >&2; echo "could not install chromium (root needed?): tests/e2e will skip" >&2; fi; \
	  rm -f "$$log"; \
	else echo "no apt-get: install chromium at /usr/bin/chromium to run tests/e2e" >&2; fi

chaos: venv  ## long fault rounds on real processes, summary table (ARGS="--faults kill9 --rounds 5")
	$(BIN)/python -m tests.chaos $(ARGS)

chaos-short: venv  ## the fault rounds CI runs (about a minute)
	$(BIN)/python -m tests.chaos --short $(ARGS)

demo: venv  ## run the built-in demo flow
	$(BIN)/pocoflow demo

bench: venv  ## run the benchmarks
	$(BIN)/python -m bench $(ARGS)

lint: venv  ## ruff check, ruff format --check, mypy on the package
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pocoflow

fmt: venv  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove build output and tool caches (keeps .venv and *.db)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove .venv too
	rm -rf $(VENV)
