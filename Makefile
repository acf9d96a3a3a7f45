# The two set-up commands of the README: `make demo` (the main job: the end-to-end demo) and `make test`.
# Each creates the virtual environment on first use and installs what it needs into it; `make test` also installs
# Debian's Chromium and ChromeDriver (as root or with password-less sudo) for the explorer's browser test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= results/demo

SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
BROWSER_PACKAGES := chromium chromium-driver

.PHONY: demo quicklook test benchmark app browser clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test,app]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python examples/demo.py --out $(OUT)

quicklook: $(BIN)/.installed
	$(BIN)/python examples/quicklook.py --out results/quicklook

# the explorer (zoo-app) on the demo's models: the demo runs first when its models are missing (~20 min on 2 cores)
app: $(BIN)/.installed
	test -d $(OUT)/hub || $(BIN)/python examples/demo.py --out $(OUT)
	$(BIN)/zoo-app --demo $(OUT)

# Chromium and its driver from Debian's packages, for tests/test_app_browser.py (skipped, saying why, without them)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  || ($(SUDO) apt-get install -y $(BROWSER_PACKAGES) || ($(SUDO) apt-get update && $(SUDO) apt-get install -y $(BROWSER_PACKAGES))) \
	  || echo "Chromium could not be installed: the browser test will be skipped"

test: $(BIN)/.installed browser
	$(BIN)/ruff check .
	$(BIN)/pytest  # not python -m: the checkout itself stays off sys.path, the tests import the installed zoo

benchmark: $(BIN)/.installed
	$(BIN)/python benchmarks/castream_throughput.py

clean:
	rm -rf $(VENV) results
