# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-heavy test-fast lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/quiver demo --warehouse warehouse

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not heavy"

test-heavy: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m heavy

test-fast: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) warehouse .pytest_cache
