"""schemathesis against the generated ``/v1/openapi.json`` of a running ``pagedq serve pagedq-tiny``:
examples drawn from the document (valid and invalid) never get a 5xx, every response conforms to
the document (status, content type, headers, body schema), and invalid data is refused."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ServeProcess

pytest.importorskip("schemathesis")
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,negative_data_rejection"
)

# starts a real `pagedq serve`: part of `make test`, not of the quick default selection
pytestmark = pytest.mark.slow


def test_the_api_conforms_to_its_openapi_document(tmp_path):
    st = shutil.which("schemathesis") or shutil.which("st")
    if st is None:
        pytest.skip("the schemathesis command is not installed")
    # a short max_model_len keeps every generated request quick on the tiny model. One worker:
    # schemathesis's workers are threads, and CPython 3.11 keeps ast's recursion-depth counter in
    # per-interpreter state, so two threads inside hypothesis's ast.parse (describing a recursive
    # JSON strategy) can trip "SystemError: AST constructor recursion depth mismatch".
    srv = ServeProcess("--api-key", "k", "--max-model-len", "48", tmp=tmp_path).start()
    try:
        out = subprocess.run(
            [
                st, "run", srv.url + "/openapi.json", "--url", srv.base, "-H", "Authorization: Bearer k",
                "--checks", CHECKS, "--max-examples", "15", "--seed", "1", "--generation-database", "none",
                "--workers", "1", "--request-timeout", "60", "--no-color",
            ],
            capture_output=True, text=True, timeout=420, cwd=tmp_path,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
        assert "passed" in out.stdout
        assert "failed" not in out.stdout.split("SUMMARY")[-1]
    finally:
        srv.stop()
