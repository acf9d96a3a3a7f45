# The two set-up commands of the README: `make demo` (the main job: the end-to-end demo) and `make test`.
# Each creates the virtual environment on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/demo

.PHONY: demo quicklook test benchmark clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py --out $(OUT)

quicklook: $(BIN)/.installed
	$(BIN)/python examples/quicklook.py --out results/quicklook

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest  # not python -m: the checkout itself stays off sys.path, the tests import the installed zoo

benchmark: $(BIN)/.installed
	$(BIN)/python benchmarks/castream_throughput.py

clean:
	rm -rf $(VENV) results
