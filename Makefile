# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv, install the project into it with the extra they need (demo: [load],
# the load generator; test: [test], which holds [load] and [train]), and install memcached
# (and, for the tests, PostgreSQL) when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test memcached postgresql

# .venv/.installed-load, .venv/.installed-test: the project installed with that extra
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$*]'
	@touch $@

memcached:
	@command -v memcached >/dev/null 2>&1 || { \
	  echo "memcached is missing: installing it with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq memcached >/dev/null; \
	  command -v memcached >/dev/null 2>&1 || $$SUDO apt-get install -y -qq --reinstall memcached >/dev/null; \
	  command -v memcached >/dev/null 2>&1 || { \
	    echo "could not install memcached: install it yourself (apt-get/dnf/brew install memcached)"; exit 1; }; \
	  if command -v systemctl >/dev/null 2>&1; then $$SUDO systemctl disable --now memcached >/dev/null 2>&1 || true; fi; }

# PostgreSQL: the fleet ledger; the tests start a private cluster with its initdb and pg_ctl.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	  echo "PostgreSQL is missing: installing it with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
	    echo "could not install PostgreSQL: install it yourself (apt-get/dnf/brew install postgresql)"; exit 1; }; \
	  if command -v systemctl >/dev/null 2>&1; then $$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || true; fi; }

demo: $(VENV)/.installed-load memcached
	$(BIN)/bidder demo

# Twice: on the worker's own HTTP path (the default), then with every server on Gunicorn's
# path (BIDDER_FAST_PATH=false; tests of the fast path's own features ask for it by flag).
test: $(VENV)/.installed-test memcached postgresql
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "--- again, every server on Gunicorn's path (BIDDER_FAST_PATH=false)"; \
	BIDDER_FAST_PATH=false $(BIN)/python -m pytest -q
