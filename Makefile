# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean-demo screenshots

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[api,production,test]"
	touch $(STAMP)

install: $(STAMP)

## Set up and run the demo site (web server + django-q2 worker) on http://127.0.0.1:8000/
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash demo_site/run_demo.sh

## Lint (ruff, and the layers contracts of pyproject.toml), then the whole test suite (real
## TensorFlow, scikit-learn, django-q2 worker, SQLite)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Re-take the README's screenshots (docs/screenshots/) with the browser tests
screenshots: $(STAMP)
	IMAGETAGS_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest tests/test_browser.py tests/test_admin_browser.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-logo

clean-demo:
	rm -rf demo.sqlite3 demo_media
