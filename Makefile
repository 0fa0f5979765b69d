VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.runtime

.PHONY: run test bench lint clean

# `make run` needs only the server's own dependencies; tests also need the dev extras (test servers,
# the mlflow client, Kerberos, which compiles against libkrb5-dev).
$(RUNTIME_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(RUNTIME_STAMP)
	$(VENV)/bin/runyard server

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.upgrades $(UPGRADE_BENCH_ARGS)
	$(PY) -m bench.stores $(STORES_BENCH_ARGS)
	$(PY) -m bench.auth $(AUTH_BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check server toolkit migrations tests bench

clean:
	rm -rf $(VENV) build *.egg-info
