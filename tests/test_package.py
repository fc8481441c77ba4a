"""The wheel installs pagedq with its subpackages mapped from the top-level folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from pagedq.kernels import native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # builds a wheel
def test_wheel_carries_subpackages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        check=True,
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    site = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = z.namelist()
        z.extractall(site)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"pagedq"}, f"the wheel installs top-level names other than pagedq: {tops}"
    # the jupyter-server extension is enabled by the config file the wheel installs
    (conf,) = [n for n in names if n.endswith("data/etc/jupyter/jupyter_server_config.d/pagedq.json")]
    enabled = json.loads(zipfile.ZipFile(tmp_path / wheel).read(conf))["ServerApp"]["jpserver_extensions"]
    assert enabled == {"pagedq.jupyter_ext": True}
    for src in (
        *(os.path.basename(p) for p in native._SRCS),
        *(os.path.basename(p) for p in native._HEADERS),
    ):
        assert f"pagedq/kernels/csrc/{src}" in names, src
    code = (
        "import shutil, pagedq, pagedq.kernels, pagedq.quant, pagedq.jupyter_ext, pagedq.models;"
        "from pagedq.kernels import native;"
        "assert native.library() is not None or shutil.which('cc') is None, 'the native kernels did not build';"
        "print(pagedq.kernels.__file__, pagedq.quant.__file__, pagedq.jupyter_ext.__file__)"
    )
    # the native kernels build from the wheel's sources, into a cache of their own
    env = dict(os.environ, PYTHONPATH=str(site), PAGEDQ_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert path.startswith(str(site)), f"{path} was not imported from the wheel"


def test_cli_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pagedq", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "generate" in out.stdout
    assert "bench" in out.stdout
