# Set-up installs the CPU build of torch first (pip finds 2.13.0 on this machine's disk), so
# that installing pagedq never pulls a multi-GB CUDA build. `make test`, `make lint` and
# `make demo` run the set-up only when something is missing (see `ready`).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TYPECHECK := .cache/typecheck

.PHONY: install setup demo test test-all test-fast lint bench gpu-check

# The set-up is done when: the dev tools import, pagedq imports from this checkout (its
# kernels/ too, which an editable install of another checkout would shadow), the server
# extension is enabled, and the browser and hub tests have what they need where the machine
# can provide it (chromium where apt-get exists, the proxy where npm exists).
define ready
$(PYTHON) -c "import os, sys, torch, pytest, ruff, mypy, hypothesis, jupyterhub, playwright, pagedq.kernels as k; \
sys.exit(0 if os.path.realpath(k.__file__).startswith(os.path.realpath('kernels')) else 1)" 2>/dev/null \
&& test -f "$$($(PYTHON) -c 'import sys; print(sys.prefix)')/etc/jupyter/jupyter_server_config.d/pagedq.json" \
&& { command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; } \
&& { ! command -v npm >/dev/null 2>&1 || test -x .cache/npm/node_modules/.bin/configurable-http-proxy; }
endef

setup:
	@$(ready) || $(MAKE) --no-print-directory install

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	@# an editable install skips the wheel's data files: enable the jupyter-server extension as the
	@# wheel does, with its config file in <sys.prefix>/etc/jupyter/jupyter_server_config.d
	$(PYTHON) -c "import os, shutil, sys; d = os.path.join(sys.prefix, 'etc', 'jupyter', 'jupyter_server_config.d'); os.makedirs(d, exist_ok=True); shutil.copy('jupyter-config/jupyter_server_config.d/pagedq.json', d)"
	@# Debian's chromium for the JupyterLab browser test (never `playwright install`); the test
	@# skips, saying why, where it cannot be installed
	@command -v chromium >/dev/null 2>&1 || ( command -v apt-get >/dev/null 2>&1 && \
		( DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		  ( apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ) ) ) || \
		echo "note: chromium not installed; the browser test will be skipped"
	@# JupyterHub's proxy for the hub end-to-end test, from npm, into .cache/npm (the test skips,
	@# saying why, where npm is missing)
	@command -v npm >/dev/null 2>&1 && { test -x .cache/npm/node_modules/.bin/configurable-http-proxy || \
		npm install --silent --no-save --no-audit --no-fund --prefix .cache/npm configurable-http-proxy@5 >/dev/null 2>&1 || \
		echo "note: npm could not install configurable-http-proxy; the hub test will be skipped"; } || \
		echo "note: npm not found; the hub test will be skipped"

demo: setup
	pagedq demo

# The default selection and the tests marked slow (servers, kernels, browsers, builds): what CI runs.
test: setup
	$(PYTHON) -m pytest -q -m "not load"

# ... and the load runs of minutes (the full serve-load).
test-all: setup
	$(PYTHON) -m pytest -q -m "load or not load"

# The quick loop: pytest's default selection (no slow marks), which still covers every feature.
test-fast: setup
	$(PYTHON) -m pytest -q

# ruff (rules in pyproject.toml), then mypy on pagedq/, kernels/ and quant/. kernels/ and quant/
# install as pagedq.kernels and pagedq.quant, which mypy cannot follow through an editable
# install: it checks a tree of links laid out as the installed package.
lint: setup
	ruff check .
	ruff format --check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/pagedq && cp -rs "$(CURDIR)/pagedq/." $(TYPECHECK)/pagedq/ \
		&& ln -s "$(CURDIR)/kernels" $(TYPECHECK)/pagedq/kernels && ln -s "$(CURDIR)/quant" $(TYPECHECK)/pagedq/quant
	cd $(TYPECHECK) && $(PYTHON) -m mypy --config-file "$(CURDIR)/pyproject.toml" --cache-dir "$(CURDIR)/.cache/mypy" pagedq

bench: setup
	pagedq bench throughput --model bench --runs 3

# The checks a first GPU must pass, in one run of under 8 minutes (pagedq/bench/gpu_check.py).
# On the GPU machine pagedq goes over its own torch, Triton and transformers, with no network:
# no dependency is installed and no build environment is fetched. Without a GPU it says what
# it would do and exits 0.
gpu-check:
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pagedq.bench.gpu_check --out "$${OUT:-.cache}/gpu-check.txt"
