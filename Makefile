# The README's two commands are `make quickstart` and `make test`; both set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-all lint clean

setup:
	@bash scripts/setup.sh

quickstart: setup
	@bash scripts/quickstart.sh $(ARGS)

test: setup
	@$(BIN)/python -m pytest -q -p no:cacheprovider

test-all: setup
	@$(BIN)/python -m pytest -q -p no:cacheprovider -m "not gpu"

lint: setup
	@$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
