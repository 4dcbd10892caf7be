# Barber: `make up` runs the whole local stack; `make test` runs the suite against a real one.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up down status test lint venv constraints

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is required" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[local,test]'
	@touch $(STAMP)

up: $(STAMP)
	$(PY) -m stack up

down: $(STAMP)
	$(PY) -m stack down

status: $(STAMP)
	$(PY) -m stack status

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint first (seconds, where the suite takes minutes): ruff's rules, its formatter and mypy,
# all configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Re-pin the image's dependencies (constraints.txt) to what this venv runs.
constraints: $(STAMP)
	$(PY) -m deploy.constraints
