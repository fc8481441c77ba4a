"""The example notebooks run top to bottom in a real kernel (nbclient), on the shipped model."""

from __future__ import annotations

import os

import pytest

# starts kernels (nbclient): part of `make test`, not of the quick default selection
pytestmark = pytest.mark.slow

nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (dev extra)")
nbformat = pytest.importorskip("nbformat")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _run(name: str, tmp_path):
    nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return nb


def _outputs(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        parts.extend(str(v) for v in o.get("data", {}).values())
    return "\n".join(parts)


def test_quickstart_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDQ_CACHE", str(tmp_path / "cache"))
    nb = _run("quickstart.ipynb", tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    streamed = _outputs(code[2])  # the first %%generate
    assert "def read_config(path):" not in streamed
    assert "tok/s" in streamed
    assert "64 tokens" in streamed
    assert "sample 2" in _outputs(code[6])  # three samples side by side
    widget = [o for o in code[9].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget, "the playground widget was not displayed"
    assert "blocks used" in _outputs(code[10])


def test_kv_cache_notebook(tmp_path):
    nb = _run("kv_cache.ipynb", tmp_path)
    text = "\n".join(_outputs(c) for c in nb.cells if c.cell_type == "code")
    assert "prompt tokens found in the cache" in text
    assert "most blocks shared at once" in text


def test_quantization_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDQ_CACHE", str(tmp_path / "cache"))
    nb = _run("quantization.ipynb", tmp_path)
    first = nb.cells[1]
    assert any("image/png" in o.get("data", {}) for o in first.outputs), "no figure was drawn"
    assert "gptq4" in _outputs(first)
    assert "KL gptq4" in _outputs(nb.cells[4])
