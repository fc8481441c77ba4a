# Set-up installs the CPU build of torch first (pip finds 2.13.0 on this machine's disk), so
# that installing pagedq never pulls a multi-GB CUDA build.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-all lint bench

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	@# Debian's chromium for the JupyterLab browser test (never `playwright install`); the test
	@# skips, saying why, where it cannot be installed
	@command -v chromium >/dev/null 2>&1 || ( command -v apt-get >/dev/null 2>&1 && \
		( DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		  ( apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 ) ) ) || \
		echo "note: chromium not installed; the browser test will be skipped"

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
