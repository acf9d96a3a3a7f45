# The two set-up commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Each creates the virtual environment on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/quicklook

.PHONY: demo test benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m zoo.quicklook --out $(OUT)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

benchmark: $(BIN)/.installed
	$(BIN)/python benchmarks/castream_throughput.py

clean:
	rm -rf $(VENV) results
