# cpis-bridge: `make run` starts the service (embedded Redis under ./var), `make test` runs lint and the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit chaos bench install clean fmt

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/cpis-bridge serve

lint: $(STAMP)
	$(BIN)/ruff check cpis_bridge tests bench
	$(BIN)/ruff format --check cpis_bridge tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q -n 2 --dist loadfile

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

chaos: $(STAMP)
	$(BIN)/pytest -q -m chaos -p no:randomly

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk || sudo apt-get install -y wrk || \
		echo "bench: wrk is missing; install it with: apt-get install -y wrk"
	$(BIN)/python -m bench.run

fmt: $(STAMP)
	$(BIN)/ruff format cpis_bridge tests bench
	$(BIN)/ruff check --fix cpis_bridge tests bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
