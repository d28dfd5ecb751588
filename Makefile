# Two commands do everything on a fresh machine:
#   make app    set up (first use only) and start the web app on the shipped model
#   make test   set up (first use only) and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: app test setup browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

app: setup
	$(BIN)/python app.py

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cache runs
