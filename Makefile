# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin is the CPU build on local disk; any other torch
# request would download a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= runs/demo
FUZZ_EXAMPLES ?= 10000

.PHONY: demo test fuzz clean

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

clean:
	rm -rf build runs $(VENV)
