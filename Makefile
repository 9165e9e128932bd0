# The two commands a newcomer needs: `make demo` and `make test`. Both install what is
# missing (a virtualenv, PostgreSQL, Kafka) and start the services on loopback.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES := scripts/services
WITH_ENV := eval "$$($(SERVICES) env)" &&

.PHONY: demo test lint unit services services-down bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

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
