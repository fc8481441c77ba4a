"""The shared engine: pagedq's jupyter-server extension in a real ``jupyter server``, its login,
``pagedq.connect()`` and ``%%generate --shared`` in a real kernel, and the engine process's
lifecycle."""

from __future__ import annotations

import getpass
import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("jupyter_server")
openai = pytest.importorskip("openai")

import pagedq  # noqa: E402
from pagedq import LLM, SamplingParams  # noqa: E402

from .conftest import child_pids, engine_pids, free_port, pid_alive, wait_for_jupyter  # noqa: E402

# starts a real Jupyter server: part of `make test`, not of the quick default selection
pytestmark = pytest.mark.slow

TOKEN = "pagedq-test-token"
PROMPT = "def parse(args):\n    "


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("server-root")
    cmd = [
        sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={port}",
        f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
        '--ServerApp.jpserver_extensions={"pagedq.jupyter_ext": True}',
        '--PagedqExtension.engine_options={"dtype": "float32"}',
    ]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server's log, closed after the yield
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_for_jupyter(base, TOKEN, proc, lambda: (root / "server.log").read_text())
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
        assert e.value.code == 403
        assert "not logged in" in json.loads(e.value.read())["error"]["message"]
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
    with pytest.raises(openai.BadRequestError, match="prompt: must be"):
        client.completions.create(model="pagedq-tiny", prompt=[1, "a"], max_tokens=2)  # a 500 for good, once
    text = metrics_text(server)
    generated = next(ln for ln in text.splitlines() if ln.startswith("pagedq_generated_tokens_total"))
    assert float(generated.rsplit(" ", 1)[1]) >= 32
    assert 'pagedq_e2e_request_latency_seconds_bucket{model="pagedq-tiny",le="+Inf"}' in text


def metrics_text(server) -> str:
    req = urllib.request.Request(server["url"] + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    return urllib.request.urlopen(req).read().decode()


def test_token_clients_are_one_user_the_servers_owner(server):
    """jupyter-server names every token request a new random anonymous user; the extension serves
    them all as the server's owner, so fair share and the metrics see one user."""
    client = openai.OpenAI(base_url=server["url"], api_key=TOKEN, max_retries=0)
    for _ in range(4):
        client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2, user="someone-else")
    users = [
        ln for ln in metrics_text(server).splitlines() if ln.startswith("pagedq_user_generated_tokens_total{")
    ]
    assert len(users) == 1, users
    assert f'user="{getpass.getuser()}"' in users[0], users


def _login(server) -> tuple[urllib.request.OpenerDirector, str]:
    """A browser-like session logged in with the server's password form; returns it and its XSRF token."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(server["base"] + "/login").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    data = urllib.parse.urlencode({"_xsrf": xsrf, "password": TOKEN}).encode()
    opener.open(server["base"] + "/login", data).read()
    assert any(c.name.startswith("username-") for c in jar), [c.name for c in jar]
    return opener, xsrf


def test_a_cookie_post_without_xsrf_is_refused_as_jupyter_server_refuses_it(server):
    opener, xsrf = _login(server)
    body = json.dumps({"model": "pagedq-tiny", "prompt": "x", "max_tokens": 2}).encode()

    def status(path, headers):
        req = urllib.request.Request(
            server["base"] + path, body, {"Content-Type": "application/json", **headers}
        )
        try:
            return opener.open(req).status
        except urllib.error.HTTPError as e:
            return e.code

    assert status("/api/contents", {}) == 403  # jupyter-server's own API, for comparison
    assert status("/pagedq/v1/completions", {}) == 403
    assert status("/pagedq/v1/completions", {"X-XSRFToken": xsrf}) == 200


def test_the_page_for_people_behind_the_login(server):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.build_opener(NoRedirect()).open(server["base"] + "/pagedq/")
    assert e.value.code == 302
    assert e.value.headers["Location"].startswith("/login?next=")
    opener, _ = _login(server)
    html = opener.open(server["base"] + "/pagedq/").read().decode()
    assert f"Signed in as <b>{getpass.getuser()}</b>" in html
    assert "KV pool" in html


def test_kill_9_of_the_engine_process_fails_requests_and_it_restarts(server):
    [engine] = engine_pids(server["proc"].pid)
    remote = pagedq.connect(server["url"], TOKEN, read_timeout=20)
    gen = remote.submit(PROMPT, SamplingParams(max_tokens=2000, ignore_eos=True))
    while gen.latest is None:
        time.sleep(0.02)
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(pagedq.GenerationError, match="SIGKILL"):
        gen.result(timeout=10)
    deadline = time.time() + 60
    statuses = []
    while time.time() < deadline:
        try:
            if json.load(urllib.request.urlopen(server["base"] + "/pagedq/ready"))["status"] == "ready":
                break
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        time.sleep(0.2)
    assert set(statuses) <= {503}, statuses  # not ready answers 503, nothing else
    out = remote.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))[0]
    assert out.outputs[0].finish_reason == "length"


def test_connect_generates_streams_and_cancels(server, reference):
    engine = pagedq.connect(server["url"], TOKEN)
    assert engine.model == "pagedq-tiny"
    out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.outputs[0].text == reference[0].text
    assert out.outputs[0].token_ids == reference[0].token_ids
    assert out.outputs[0].finish_reason == "length"
    assert out.finished
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
    assert gen.latest.outputs[0].finish_reason == "abort"
    assert seen[-1] < 900
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate("x " * 3000, SamplingParams(max_tokens=2))
    assert len(engine.generate(["a", "b"], SamplingParams(max_tokens=3))) == 2  # still serving


def test_connect_finds_the_server_of_this_kernel(monkeypatch):
    from pagedq.serve import client

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
    workers = [p for p in child_pids(proc.pid) if pid_alive(p)]
    assert workers, "the engine process should be running after the requests above"
    urllib.request.urlopen(
        urllib.request.Request(f"{server['base']}/api/shutdown?token={TOKEN}", method="POST")
    )
    assert proc.wait(30) == 0
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    log = server["log"].read_text()
    assert "engine for 'pagedq-tiny' ready" in log
    assert "was killed by SIGKILL; restarting it" in log
