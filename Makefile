# The two set-up commands of the README. Each creates its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# torch pinned here so pip takes the CPU build on this machine's disk (pyproject keeps a range).
TORCH = torch==2.13.0

OPTIMUM_VENV ?= .venv-optimum
FLOORS_VENV ?= .venv-floors

.PHONY: demo test test-slow test-floors docs optimum-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

demo: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[export,openvino,genai]"
	$(VENV)/bin/starlift demo

# The suite has two tiers (pytest marker `slow`, pyproject.toml). `make test` is the fast tier: every
# stage end to end on real components (export both flavours, quantize, the four runners, engine,
# server, parity, localization). `make test-slow` is the rest: each documentation page's examples,
# the peers (optimum-onnx, llama.cpp), fresh-venv installs, half-precision exports, killed exports,
# signing, Ray clusters, big-model paths, classification heads. CI (.ci/run) runs both.
test: $(VENV)/bin/python
	$(PIP) install -q $(TORCH) -e ".[test]"
	$(VENV)/bin/python -m pytest -q -m "not slow" --durations=10

test-slow: $(VENV)/bin/python optimum-venv
	$(PIP) install -q $(TORCH) -e ".[test]"
	STARLIFT_OPTIMUM_PYTHON=$(abspath $(OPTIMUM_VENV))/bin/python STARLIFT_LLAMA_CPP=$(LLAMA_DIR) \
		$(VENV)/bin/python -m pytest -q -m slow --durations=15

# The documentation site (MkDocs + mkdocstrings), warnings as errors: into site/.
# Its own venv with a regular (not editable) install: griffe follows an editable install's finder
# back to the repository's stage folders, where starlift.runtimes & co. are not a package tree.
# The core install is enough (the CLI reference reads the parsers; no torch).
DOCS_VENV ?= .venv-docs

docs:
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install -q --upgrade pip
	$(DOCS_VENV)/bin/pip install -q ".[docs]"
	# mkdocstrings globs its `paths` when it starts: on a clean clone build/docs-src must exist by
	# then or it falls back to the repository root (no starlift.runtimes there); the hook fills it.
	mkdir -p build/docs-src
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict

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

# llama.cpp, the CPU peer of `starlift bench --llama-cpp` and the server to beat (issue 14), built
# from PyPI's llama-cpp-python source distribution and its vendored llama.cpp tree (PyPI has no
# wheel). Into LLAMA_CPP_DIR: venv/ (llama-cpp-python, plus convert_hf_to_gguf.py's own
# requirements: transformers<5, torch pinned as above), bin/llama-server, and llama.cpp/ (the
# vendored tree, with convert_hf_to_gguf.py). About 20 min per build on 2 cores.
# The instruction sets are read from /proc/cpuinfo and passed one by one with GGML_NATIVE=OFF:
# -march=native (pip's default build) gave SIGILL on quantized models on an earlier machine, and
# AMX stays off (see ../shared/PEERS.md). Override LLAMA_CPP_CMAKE_ARGS to build for another CPU.
LLAMA_CPP_DIR ?= $(HOME)/.cache/starlift/llama.cpp
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_JOBS ?= 2
LLAMA_DIR := $(abspath $(LLAMA_CPP_DIR))
LLAMA_SRC := $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION)
LLAMA_SDIST := $(LLAMA_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) \
	-DGGML_AVX_VNNI=$(call cpu_has,avx_vnni) -DGGML_AVX512=$(call cpu_has,avx512f) \
	-DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: llama-cpp
llama-cpp: $(LLAMA_DIR)/venv/.installed $(LLAMA_DIR)/bin/llama-server

$(LLAMA_SRC)/.unpacked:
	mkdir -p $(LLAMA_DIR)/src
	$(PYTHON) -m pip download -q --no-binary :all: --no-deps --no-cache-dir -d $(LLAMA_DIR)/src \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_DIR)/src
	ln -sfn $(LLAMA_SRC)/vendor/llama.cpp $(LLAMA_DIR)/llama.cpp
	touch $@

# --no-cache-dir: pip would otherwise reuse a wheel built earlier with other flags.
$(LLAMA_DIR)/venv/.installed: $(LLAMA_SRC)/.unpacked
	$(PYTHON) -m venv $(LLAMA_DIR)/venv
	$(LLAMA_DIR)/venv/bin/pip install -q --upgrade pip
	$(LLAMA_DIR)/venv/bin/pip install -q $(TORCH) numpy sentencepiece "transformers==4.57.6" safetensors \
		"protobuf<5" $(LLAMA_SRC)/vendor/llama.cpp/gguf-py
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(LLAMA_CPP_JOBS) \
		nice $(LLAMA_DIR)/venv/bin/pip install -q --no-cache-dir $(LLAMA_SDIST)
	touch $@

# The server, static, from the same tree and flags; no web UI download, no HTTPS.
$(LLAMA_DIR)/bin/llama-server: $(LLAMA_SRC)/.unpacked
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_DIR)/build-server -DCMAKE_BUILD_TYPE=Release \
		$(LLAMA_CPP_CMAKE_ARGS) -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
	nice cmake --build $(LLAMA_DIR)/build-server --target llama-server -j $(LLAMA_CPP_JOBS)
	mkdir -p $(LLAMA_DIR)/bin
	cp $(LLAMA_DIR)/build-server/bin/llama-server $@
