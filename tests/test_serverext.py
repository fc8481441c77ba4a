"""The shared engine: pagedq's jupyter-server extension in a real ``jupyter server``, its login,
``pagedq.connect()`` and ``%%generate --shared`` in a real kernel, and the engine process's
lifecycle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("jupyter_server")
openai = pytest.importorskip("openai")

import pagedq  # noqa: E402
from pagedq import LLM, SamplingParams  # noqa: E402

from .conftest import wait_for_jupyter  # noqa: E402

TOKEN = "pagedq-test-token"
PROMPT = "def parse(args):\n    "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    root = tmp_path_factory.mktemp("server-root")
    cmd = [
        sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={port}",
        f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
        '--ServerApp.jpserver_extensions={"pagedq.jupyter_ext": True}',
        '--PagedqExtension.engine_options={"dtype": "float32"}',
    ]  # fmt: skip
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_for_jupyter(base, TOKEN, proc, lambda: open(root / "server.log").read())
    yield {"url": f"{base}/pagedq/v1", "base": base, "proc": proc, "log": root / "server.log"}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def reference():
    with LLM("pagedq-tiny", dtype="float32") as llm:
        sp = SamplingParams(temperature=0, max_tokens=16)
        chat = llm.chat([{"role": "user", "content": "hello"}], sp, use_tqdm=False)[0].outputs[0]
        return llm.generate(PROMPT, sp, use_tqdm=False)[0].outputs[0], chat


def test_the_api_sits_behind_the_server_login(server, reference):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(server["url"] + "/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 403 and "not logged in" in json.loads(e.value.read())["error"]["message"]
    client = openai.OpenAI(base_url=server["url"], api_key=TOKEN, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["pagedq-tiny"]
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == reference[0].text
    chunks = client.chat.completions.create(
        model="pagedq-tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference[1].text
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model="pagedq-tiny", prompt="x " * 3000, max_tokens=2)
    # the worker process's counters, attributed to the logged-in user
    req = urllib.request.Request(server["url"] + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    text = urllib.request.urlopen(req).read().decode()
    generated = next(ln for ln in text.splitlines() if ln.startswith("pagedq_generated_tokens_total"))
    assert float(generated.rsplit(" ", 1)[1]) >= 32
    assert "pagedq_user_served_tokens{" in text
    assert 'pagedq_e2e_request_latency_seconds_bucket{model="pagedq-tiny",le="+Inf"}' in text


def test_connect_generates_streams_and_cancels(server, reference):
    engine = pagedq.connect(server["url"], TOKEN)
    assert engine.model == "pagedq-tiny"
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.outputs[0].text == reference[0].text and out.outputs[0].token_ids == reference[0].token_ids
    assert out.outputs[0].finish_reason == "length" and out.finished
    assert (
        engine.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=16))
        .outputs[0]
        .text
        == reference[1].text
    )
    gen = engine.submit(PROMPT, SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
    seen = []
    for o in gen.outputs():
        seen.append(len(o.outputs[0].token_ids))
        if len(seen) == 3:
            gen.cancel()
    assert gen.latest.outputs[0].finish_reason == "abort" and seen[-1] < 900
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate("x " * 3000, SamplingParams(max_tokens=2))
    assert len(engine.generate(["a", "b"], SamplingParams(max_tokens=3))) == 2  # still serving


def test_connect_finds_the_server_of_this_kernel(monkeypatch):
    from pagedq.jupyter_ext import client

    servers = [
        {"pid": 111, "url": "http://127.0.0.1:1/", "token": "t1"},
        {"pid": 222, "url": "http://127.0.0.1:2/lab-base/", "token": ""},
    ]
    monkeypatch.delenv("PAGEDQ_URL", raising=False)
    monkeypatch.setattr("jupyter_server.serverapp.list_running_servers", lambda: iter(servers))
    monkeypatch.setattr(os, "getppid", lambda: 222)
    assert client._discover() == ("http://127.0.0.1:2/lab-base/pagedq/v1", None)
    monkeypatch.setattr(os, "getppid", lambda: 333)
    with pytest.raises(ValueError, match="cannot tell which Jupyter server"):
        client._discover()
    monkeypatch.setenv("PAGEDQ_URL", "http://h:9/v1")
    monkeypatch.setenv("PAGEDQ_TOKEN", "k")
    assert client._discover() == ("http://h:9/v1", "k")


def test_generate_shared_cell_magic_in_a_kernel(server, reference):
    pytest.importorskip("ipykernel")
    from .test_jupyter import Kernel

    k = Kernel()
    try:
        k.run(
            f"import os; os.environ['PAGEDQ_URL'] = {server['url']!r}; os.environ['PAGEDQ_TOKEN'] = {TOKEN!r}"
        )
        k.run("%load_ext pagedq")
        msgs = k.run(f"%%generate --shared --max-tokens 16 --temperature 0 -o out\n{PROMPT}")
        assert any(m["msg_type"] == "display_data" for m in msgs)
        assert k.value("out.outputs[0].text") == reference[0].text
        assert k.value("out.outputs[0].finish_reason") == "length"
    finally:
        k.close()


def test_stopping_the_server_stops_the_engine_process(server):
    proc = server["proc"]
    workers = _children(proc.pid)
    assert workers, "the engine process should be running after the requests above"
    urllib.request.urlopen(
        urllib.request.Request(f"{server['base']}/api/shutdown?token={TOKEN}", method="POST")
    )
    assert proc.wait(30) == 0
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    assert "pagedq: engine for 'pagedq-tiny' is up" in open(server["log"]).read()
