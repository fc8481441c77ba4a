"""A real JupyterLab in Debian's chromium (Playwright): open the quickstart notebook, run all
cells, and see the streamed text and the playground widget appear in the page."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from .conftest import wait_for_jupyter

# starts a browser and a JupyterLab server: part of `make test`, not of the quick default
# selection
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
pytest.importorskip("jupyterlab", reason="the browser test needs jupyterlab (dev extra)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)",
        allow_module_level=True,
    )

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    shutil.copy(os.path.join(EXAMPLES, "quickstart.ipynb"), tmp_path / "quickstart.ipynb")
    port, token = _free_port(), "pagedq-test"
    env = dict(os.environ, PAGEDQ_CACHE=str(tmp_path / "cache"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_for_jupyter(url, token, proc, lambda: proc.stdout.read().decode(errors="replace"))
    yield url, token
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_quickstart_runs_in_jupyterlab(lab):
    url, token = lab
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # JupyterLab 4.6 asks which kernel to start even when the notebook names one that is
            # installed ("Select Kernel", its preferred kernel preselected): accept the preselection
            dialog = page.locator(".jp-Dialog:has-text('Select Kernel') .jp-mod-accept")
            try:
                dialog.wait_for(timeout=15_000)
                dialog.click()
            except sync_api.TimeoutError:
                pass  # older JupyterLab starts the notebook's kernel without asking
            # a Run All before the kernel is connected can be dropped: wait for it to be idle
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            # Kernel > Restart Kernel and Run All would ask for confirmation; Run > Run All Cells does not
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            # the first %%generate streams and ends with its footer
            try:
                page.wait_for_selector(".jp-OutputArea-output:has-text('tok/s')", timeout=180_000)
            except sync_api.TimeoutError:
                shot = os.path.join(tempfile.gettempdir(), "pagedq-browser-failure.png")
                page.screenshot(path=shot, full_page=True)
                raise AssertionError(f"no streamed output; the page is in {shot}") from None
            # three samples side by side, then the playground widget rendered by ipywidgets
            page.wait_for_selector(".jp-OutputArea-output:has-text('sample 2')", timeout=180_000)
            page.wait_for_selector(".jp-OutputArea-output button:has-text('Generate')", timeout=180_000)
            page.wait_for_selector(".jp-OutputArea-output:has-text('blocks used')", timeout=180_000)
            if os.environ.get("PAGEDQ_SCREENSHOT"):
                page.screenshot(path=os.environ["PAGEDQ_SCREENSHOT"], full_page=True)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not any("Error" in t for t in errors.all_inner_texts())
        finally:
            browser.close()
