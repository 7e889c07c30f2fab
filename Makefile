# milterd: `make run` and `make test` do all the set-up on a fresh Debian machine (as root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
CONFIG ?= etc/milterd.toml
# Debian packages. To run the daemon: what builds pymilter and the virtual environment
# (`make run` installs no more: no MTA, which on a sendmail host would replace sendmail
# with Postfix). For the tests: Postfix, OpenDKIM, Redis, spamd, rspamd... as well.
RUN_PACKAGES := libmilter-dev gcc python3-dev python3-venv
APT_PACKAGES := $(RUN_PACKAGES) postfix opendkim opendkim-tools \
                redis-server swaks sasl2-bin libsasl2-modules systemd m4 sendmail-cf \
                spamassassin spamd spamc rspamd openssl
STAMP := $(VENV)/.installed

.PHONY: help run test lint unit integration deps run-deps apt venv bench clean
# The set-up steps depend on each other's effects (the venv needs python3-venv installed
# first; two apt-get runs would fight over dpkg's lock): never in parallel, even with -j.
.NOTPARALLEL:

help:
	@echo "make run          install what is missing, start the daemon with $(CONFIG)"
	@echo "make test         install what is missing, lint, run the whole suite"
	@echo "make unit         the unit tests only (no MTA, no daemons)"
	@echo "make integration  the integration tests only (Postfix, sendmail, DNS, ...)"
	@echo "make lint         ruff and mypy"
	@echo "make bench        the benchmarks; rewrites bench/RESULTS.md"
	@echo "make clean        remove the virtual environment and caches"

run: run-deps $(STAMP)
	$(VENV)/bin/milterd -c $(CONFIG) run

test: deps $(STAMP) lint
	MILTERD_STRICT=1 $(PY) -m pytest -q -ra --durations=10

unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

integration: deps $(STAMP)
	$(PY) -m pytest -q -m integration

lint: $(STAMP)
	$(VENV)/bin/ruff check milterd plugins tests bench examples
	$(VENV)/bin/mypy

# Installs only what is missing. Postfix is installed unconfigured: tests run private
# instances, never the system one.
deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(APT_PACKAGES)"

run-deps:
	@$(MAKE) --no-print-directory apt PACKAGES="$(RUN_PACKAGES)"

apt:
	@missing=$$(for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "run as root (or install: $$missing)"; exit 1; fi; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The test plugins are not installed (tests/conftest.py puts them on the path); a venv
# made before that loses them here.
$(STAMP): Makefile pyproject.toml examples/milterd-example-header/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e examples/milterd-example-header
	$(PY) -m pip uninstall -q -y milterd-testplugins 2>/dev/null || true
	touch $@

venv: $(STAMP)

bench: deps $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .hypothesis .pytest_cache \
		examples/*/src/*.egg-info examples/*/build
