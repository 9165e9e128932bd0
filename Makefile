# The two commands a newcomer needs: `make demo` and `make test`. Both install what is
# missing (a virtualenv, PostgreSQL, Kafka) and start the services on loopback.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock" --quiet $(if $(UPGRADE),--upgrade)
SERVICES := scripts/services
WITH_ENV := eval "$$($(SERVICES) env)" &&

.PHONY: demo test lint unit lock services services-down bench clean

# Exactly the locked versions (hash-checked), then the project itself without resolving
# anything: a fresh machine gets the versions the tests passed with. Needs only pip.
$(STAMP): pyproject.toml $(DEV_LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	@$(BIN)/pip install --quiet --no-deps -e .
	@touch $(STAMP)

## Re-resolve the lock files after a change to pyproject.toml's dependencies (keeps every
## other pin); `make lock UPGRADE=1` moves every pin to the newest release in its range.
lock: $(STAMP)
	@$(BIN)/pip install --quiet 'uv>=0.9,<1'
	@$(UV_COMPILE) -o $(LOCK)
	@$(UV_COMPILE) --extra dev --constraint $(LOCK) -o $(DEV_LOCK)
	@$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)

services:
	@$(SERVICES) up

## The whole pipeline on generated traffic, on this machine.
demo: $(STAMP) services
	@$(WITH_ENV) $(BIN)/sync-service db upgrade
	@$(WITH_ENV) $(BIN)/sync-service demo

## Every check and every test, unit and integration (real Kafka and PostgreSQL).
test: $(STAMP) services lint
	@$(WITH_ENV) $(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/mypy

## Unit tests only: no services needed.
unit: $(STAMP)
	@$(BIN)/pytest -q tests/unit

## The benchmark (see bench/README.md); EVENTS=100000 for a quick run.
bench: $(STAMP) services
	@$(WITH_ENV) $(BIN)/python -m bench $(if $(EVENTS),--events $(EVENTS))

services-down:
	@$(SERVICES) down

clean: services-down
	rm -rf $(VENV) .services .mypy_cache .ruff_cache .pytest_cache .hypothesis
