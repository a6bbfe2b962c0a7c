# The two set-up commands of the README. Each creates its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# torch pinned here so pip takes the CPU build on this machine's disk (pyproject keeps a range).
TORCH = torch==2.13.0

.PHONY: demo test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

demo: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[openvino,genai]"
	$(VENV)/bin/starlift demo

test: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[test]"
	$(VENV)/bin/python -m pytest -q
