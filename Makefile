# The two set-up commands of the README. Each creates its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# torch pinned here so pip takes the CPU build on this machine's disk (pyproject keeps a range).
TORCH = torch==2.13.0

OPTIMUM_VENV ?= .venv-optimum
FLOORS_VENV ?= .venv-floors

.PHONY: demo test test-floors docs optimum-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

demo: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[export,openvino,genai]"
	$(VENV)/bin/starlift demo

test: $(VENV)/bin/python optimum-venv
	$(PIP) install -q $(TORCH) -e ".[test]"
	STARLIFT_OPTIMUM_PYTHON=$(abspath $(OPTIMUM_VENV))/bin/python $(VENV)/bin/python -m pytest -q

# The documentation site (MkDocs + mkdocstrings), warnings as errors: into site/.
docs: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The floors pyproject.toml declares, made true: a venv with the oldest allowed versions
# (ci/floors.txt, as pip constraints) runs the export, quantize and runtime tests.
test-floors:
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/pip install -q -c ci/floors.txt -e ".[export,openvino,genai]" pytest hypothesis transformers
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_export.py tests/test_quantize.py \
		tests/test_runtimes.py

# optimum-onnx (the `starlift bench --optimum` peer) needs transformers<4.58, so it lives in its own
# venv, run as a subprocess by starlift/optimum_worker.py. The inner .gitignore keeps git
# out of it; the stamp is written last so an interrupted install is redone. onnx-ir: for
# onnxruntime.quantization.matmul_nbits_quantizer (the int4 row).
optimum-venv: $(OPTIMUM_VENV)/.installed

$(OPTIMUM_VENV)/.installed:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	echo '*' > $(OPTIMUM_VENV)/.gitignore
	$(OPTIMUM_VENV)/bin/pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/pip install -q $(TORCH) optimum-onnx onnxruntime==1.32.0 onnx-ir numpy
	touch $@
