# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv, install the project into it, and install memcached (and, for the tests,
# PostgreSQL) when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test memcached postgresql

$(BIN)/bidder: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
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

demo: $(BIN)/bidder memcached
	$(BIN)/bidder demo

test: $(BIN)/bidder memcached postgresql
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
