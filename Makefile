# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Tests run against both databases; this one is used for the PostgreSQL pass.
TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/mlxserve

.PHONY: run test test-quick lint typecheck pytest pytest-sqlite pytest-postgres bench clean

$(VENV)/.installed: requirements-worker.txt requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	./bin/run

test: $(VENV)/.installed lint typecheck pytest

# The edit-test loop: everything but the tests that start servers and workers (marked `slow` in
# tests/conftest.py), SQLite only, no coverage: under two minutes here. `make test` is the gate.
test-quick: $(VENV)/.installed
	env -u DATABASE_URL $(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy .

# The schema and validation modules must keep 90% coverage or more.
pytest: pytest-sqlite pytest-postgres
	$(VENV)/bin/coverage report --fail-under=90 --include='mlxserve/contract/*.py'
	$(VENV)/bin/coverage report

# Exit code 5 means "no tests collected" (say, a -k that matches nothing): not a failure.
pytest-sqlite: $(VENV)/.installed
	env -u DATABASE_URL $(VENV)/bin/pytest --cov --cov-report= $(PYTEST_ARGS) || [ $$? -eq 5 ]

pytest-postgres: $(VENV)/.installed
	DATABASE_URL=$(TEST_POSTGRES_URL) $(VENV)/bin/pytest --cov --cov-append --cov-report= $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: $(VENV)/.installed
	$(PY) bench/validation.py

clean:
	rm -rf $(VENV) staticfiles .coverage .pytest_cache .mypy_cache .ruff_cache
