# `make demo`: set up and run the CPU demo.  `make test`: set up and run the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TPU    := $(VENV)/.installed-tpu

.PHONY: demo test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(TPU): $(STAMP) requirements-tpu.txt
	$(PY) -m pip install -q -r requirements-tpu.txt
	touch $(TPU)

# the CPU demo: JAX must not look for a TPU even where libtpu is installed (after `make test`)
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m hidrop_jax.demo

# pytest exits 5 when it collects no test: not a failure of the suite. Two workers (pytest-xdist),
# each test file on one of them (module fixtures are built once): CI has 2 cores; more workers
# on a bigger machine: `make test WORKERS=8` (each holds JAX and torch, ~2-5 GB).
WORKERS ?= 2
test: $(TPU)
	$(PY) -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist loadfile; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/flops.py

clean:
	rm -rf $(VENV) .pytest_cache
