# Set-up installs the CPU build of torch first (pip finds 2.13.0 on this machine's disk), so
# that installing pagedq never pulls a multi-GB CUDA build.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-all lint bench

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

demo: install
	pagedq demo

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:
	ruff check . && ruff format --check .

bench: install
	pagedq bench throughput --model bench --runs 3
