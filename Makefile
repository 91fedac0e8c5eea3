PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install clean

$(BIN)/sluice: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/sluice

run: install
	$(BIN)/sluice serve

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) var .pytest_cache
