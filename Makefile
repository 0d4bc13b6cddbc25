# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin is the CPU build on local disk; any other torch
# request would download a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
DEMO_OUT ?= runs/demo

.PHONY: demo test mutation clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	touch $@

# The demo needs only the package and a tokenizer library; the tests also need pytest, ruff,
# pyarrow and lm-evaluation-harness.
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
	rm -rf build runs mutants $(VENV)
