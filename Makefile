# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin is the CPU build on local disk; any other torch
# request would download a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= runs/demo
FUZZ_EXAMPLES ?= 10000

.PHONY: demo test fuzz mutation clean check-exports check-exports-mlx check-exports-compressed-tensors check-exports-llama-cpp

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	touch $@

# The demo needs only the package and a tokenizer library; the tests also need pytest, ruff,
# pyarrow, lm-evaluation-harness and hypothesis.
$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -e ".[demo]"
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install -e ".[test]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/moescope demo --out $(DEMO_OUT)

test: $(VENV)/.test
	$(VENV)/bin/ruff check moescope tests benchmarks scripts
	$(VENV)/bin/pytest -q || [ $$? -eq 5 ]

# The parsers' fuzz harness, long: FUZZ_EXAMPLES examples per parser (the suite runs 40).
fuzz: $(VENV)/.test
	MOESCOPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py
# Round trips of the exports through the real runtimes (docs/quantization.md, scripts/roundtrip/): each
# runtime gets its own environment under $(RT) with moescope and the extra roundtrip-RUNTIME; llama.cpp
# is built from llama-cpp-python's sources (pinned: llama.cpp 0c1e570), portably: a GGML_NATIVE build
# is tied to the CPU it was built on. Not part of `make test`: installing takes minutes, the build
# 5.4 CPU-minutes, so it is kept in a cache outside the clone, one folder per version.
RT ?= .roundtrip
LLAMA_CPP_PYTHON_VERSION ?= 0.3.36
LLAMA_CPP_CACHE ?= $(HOME)/.cache/moescope-roundtrip
LLAMA_CPP_PYTHON ?= $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)
LLAMA_CPP_ISA := $(if $(filter x86_64,$(shell uname -m)),-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
# $ORIGIN-relative RPATH: the build can be moved.
LLAMA_CPP_CMAKE := -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	-DGGML_OPENMP=OFF -DGGML_NATIVE=OFF $(LLAMA_CPP_ISA)

$(RT)/%/.installed: pyproject.toml
	python3 -m venv $(RT)/$*
	$(RT)/$*/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0
	$(RT)/$*/bin/python -m pip --disable-pip-version-check -q install -e ".[roundtrip-$*]"
	touch $@

$(LLAMA_CPP_PYTHON)/.built:
	mkdir -p $(LLAMA_CPP_CACHE)
	python3 -m pip --disable-pip-version-check download -q --no-deps --no-binary :all: -d $(LLAMA_CPP_CACHE) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	tar -xzf $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz -C $(LLAMA_CPP_CACHE)
	cmake -S $(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build $(LLAMA_CPP_CMAKE) >/dev/null
	cmake --build $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/build -j 2 --target llama-quantize llama-perplexity >/dev/null
	touch $@

check-exports: check-exports-mlx check-exports-compressed-tensors check-exports-llama-cpp

check-exports-mlx: $(RT)/mlx/.installed
	$(RT)/mlx/bin/python scripts/roundtrip/check.py mlx --work $(RT)/work

check-exports-compressed-tensors: $(RT)/compressed-tensors/.installed
	$(RT)/compressed-tensors/bin/python scripts/roundtrip/check.py compressed-tensors --work $(RT)/work
	$(RT)/compressed-tensors/bin/python scripts/roundtrip/check.py compressed-tensors-vllm --work $(RT)/work

check-exports-llama-cpp: $(RT)/llama-cpp/.installed $(LLAMA_CPP_PYTHON)/.built
	$(RT)/llama-cpp/bin/python scripts/roundtrip/check.py llama-cpp --work $(RT)/work \
		--llama-cpp-python $(LLAMA_CPP_PYTHON)

# Mutation testing (docs/testing.md): mutmut rewrites the modules listed in pyproject.toml's [tool.mutmut]
# one change at a time and runs the tests that reach it. MUTATE picks mutants by name, one module or a few
# functions at a time (all of them take many hours on 2 cores), e.g.
#   make mutation MUTATE='moescope.judge.nll.*'
MUTATE ?= moescope.judge.nll.*
$(VENV)/.mutation: $(VENV)/.test
	$(PIP) install -e ".[mutation]"
	touch $@

mutation: $(VENV)/.mutation
	nice -n 10 $(VENV)/bin/mutmut run --max-children 2 $(MUTATE)
	$(VENV)/bin/mutmut results

clean:
	rm -rf build runs mutants $(VENV) $(RT)
