# Two entry points, each installing what it needs into .venv first:
#   make demo   the offline NetTailor demo (synthetic tasks, CPU, no downloads)
#   make test   the test suite
PYTHON ?= python3
VENV := .venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/python demo_synthetic.py

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n 2 tests
