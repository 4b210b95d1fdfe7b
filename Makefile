# The two commands of the README:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: run test setup setup-test bench clean

run: setup
	$(PY) launch.py $(ARGS)

# Two workers, one test file each at a time (module fixtures are built once); see tests/conftest.py.
test: setup-test
	$(PY) -m pytest -q -n 2 --dist loadfile tests

setup: $(VENV)/.run-deps

setup-test: $(VENV)/.test-deps

$(VENV)/.run-deps: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m jaxprompt.tokenizer --fetch-vocab
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Every benchmark against its reference (under 15 minutes on 2 cores); writes BENCHMARKS.md.
# BENCH_ARGS=--quick for a smoke test. The GPU script is separate: bash benchmarks/gpu.sh
bench: setup-test
	PYTHONPATH=. $(PY) benchmarks/run_all.py $(BENCH_ARGS)
	PYTHONPATH=. $(PY) benchmarks/bench_sharding.py
	PYTHONPATH=. $(PY) benchmarks/bench_coop_memory.py

clean:
	rm -rf $(VENV) .jax_cache workdir
