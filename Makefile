# The two commands: `make up` runs the engine, `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test install lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/.installed

up: install
	$(BIN)/citadel up

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/citadel bench chain40
	$(BIN)/citadel bench long10
	$(BIN)/citadel bench throughput

clean:
	rm -rf .citadel .pytest_cache .mypy_cache .ruff_cache
