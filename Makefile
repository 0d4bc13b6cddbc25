# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin is the CPU build on local disk; any other torch
# request would download a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_DIR ?= build/demo

.PHONY: demo test lint clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	mkdir -p $(DEMO_DIR)
	$(PY) -m moescope.tiny qwen3_moe $(DEMO_DIR)/tiny-qwen3-moe
	$(VENV)/bin/moescope inspect $(DEMO_DIR)/tiny-qwen3-moe

test: $(VENV)/.installed
	$(VENV)/bin/ruff check moescope tests benchmarks scripts
	$(VENV)/bin/pytest -q

clean:
	rm -rf build $(VENV)
