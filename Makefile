# xcflushd — developer and release tasks. Every knob is ?= overridable; `make help` lists targets.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The fast tier: what `make check` leaves out (see SLOW in tests/conftest.py).
CHECK_MARKERS ?= not slow and not lab
DURATIONS ?= 10
# Test files run in parallel, each file in one worker (most tests wait on processes, not the CPU).
WORKERS ?= -n 4 --dist loadfile
SYSTEM_PACKAGES_FILE := tests/system-packages.txt

.DEFAULT_GOAL := help
.PHONY: help deps install run check test test-deploy lint clean bench chaos

help:
	@echo "make run      run the daemon against a local redis-server and backend simulator (Ctrl-C stops all)"
	@echo "make check    the fast tier: unit and quick integration tests (under 90 s)"
	@echo "make test     run the whole test suite, as CI does (installs what is missing first)"
	@echo "make lint     ruff over the package and tests"
	@echo "make bench    flush-cycle and priority-path benchmark (JSON + table + plot)"
	@echo "make chaos    the long fault-injection run (kills, Redis restarts, backend faults)"
	@echo "make test-deploy  the Ansible end-to-end rollout on three systemd-nspawn nodes"
	@echo "make collection  the Ansible collection threescale.xcflushd (build/*.tar.gz)"
	@echo "make clean    remove the virtualenv, build outputs and caches"

# System packages the tests need (redis-server, gnupg, ...). Installed with apt-get
# only when missing, so a second run costs nothing.
deps:
	@missing=$$(grep -v '^\s*#' $(SYSTEM_PACKAGES_FILE) | awk '{print $$1}' | grep . | \
	  while read p; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing >/dev/null; \
	fi

# The simulator (sim/) is a distribution of its own, installed beside the daemon for make run,
# make bench and the tests; the release wheel holds the daemon only.
$(VENV)/.installed: setup.cfg pyproject.toml sim/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e ./sim
	touch $@

install: $(VENV)/.installed

run: deps install
	$(PY) -m xcflushd_sim.devrun

check: deps install
	$(PY) -m pytest $(WORKERS) -m "$(CHECK_MARKERS)" $(PYTEST_ARGS)

test: deps install
	$(PY) -m pytest $(WORKERS) --durations=$(DURATIONS) $(PYTEST_ARGS)

test-deploy: deps install
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

chaos: deps install
	XCFLUSHD_CHAOS=long $(PY) -m pytest tests/reliability $(PYTEST_ARGS)

bench: deps install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) tests/bench/bench.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check xcflushd sim tests

clean:
	rm -rf $(VENV) build dist *.egg-info sim/build sim/*.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include signing/release.mk
-include ansible/collection.mk
