PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install peers clean

$(BIN)/sluice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/sluice

run: install
	$(BIN)/sluice serve

# Real peers for the tests (Postfix, swaks), from Debian when absent.
peers:
	@tests/install-peers.sh

test: install peers
	$(BIN)/python -m pytest -q -n 3  # three at a time: most tests wait on servers, not the CPU

clean:
	rm -rf $(VENV) var .pytest_cache
