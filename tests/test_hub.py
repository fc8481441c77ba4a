"""JupyterHub service mode (``pagedq serve --hub``): users are who the Hub API says own the
request's token, they share the engine fairly, and nobody gets in without a hub token. The Hub
is a stand-in that answers ``GET /hub/api/user`` as JupyterHub does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from pagedq import LLM

from .test_openai_api import Server

openai = pytest.importorskip("openai")
pytest.importorskip("tornado")

import tornado.web  # noqa: E402

TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


class FakeHubUser(tornado.web.RequestHandler):
    asked = 0

    def get(self):
        FakeHubUser.asked += 1
        token = self.request.headers.get("Authorization", "").removeprefix("token ")
        if token not in TOKENS:
            raise tornado.web.HTTPError(403)
        self.finish(json.dumps({"name": TOKENS[token], "kind": "user", "scopes": ["access:services"]}))


def fake_hub() -> tornado.web.Application:
    return tornado.web.Application([("/hub/api/user", FakeHubUser)])


@pytest.fixture(scope="module")
def hub_served(monkeypatch_module):
    from pagedq.jupyter_ext.hub import HubUsers

    monkeypatch_module.setenv("JUPYTERHUB_SERVICE_PREFIX", "/services/pagedq/")
    llm = LLM("pagedq-tiny", dtype="float32", scheduling_policy="fair")
    users = HubUsers("http://placeholder")
    server = Server(llm, extra_apps=[fake_hub()], hub=users)
    users.api_url = f"http://127.0.0.1:{server.extra_ports[0]}/hub/api"
    base = f"http://127.0.0.1:{server.port}/services/pagedq/v1"
    yield llm, base, users
    server.stop()
    llm.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_hub_users_share_one_engine(hub_served):
    llm, base, _ = hub_served
    results = {}

    def ask(token):
        client = openai.OpenAI(base_url=base, api_key=token, max_retries=0)
        # the body's user field is ignored: the hub token decides who asks
        r = client.completions.create(model="pagedq-tiny", prompt="def f(", max_tokens=8, user="mallory")
        results[token] = r.usage.completion_tokens

    threads = [threading.Thread(target=ask, args=(t,)) for t in TOKENS for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == set(TOKENS)
    served = llm.engine.scheduler.policy.served
    assert served.get("alice", 0) > 0 and served.get("bob", 0) > 0 and "mallory" not in served


def test_no_hub_token_no_service(hub_served):
    _, base, users = hub_served
    for key in ("", "tok-eve"):
        client = openai.OpenAI(base_url=base, api_key=key or "-", max_retries=0)
        if not key:
            client = openai.OpenAI(
                base_url=base, api_key="unused", max_retries=0, default_headers={"Authorization": ""}
            )
        with pytest.raises(openai.PermissionDeniedError, match="hub"):
            client.models.list()
    # answers are cached: asking again with a known token does not ask the hub again
    client = openai.OpenAI(base_url=base, api_key="tok-alice", max_retries=0)
    client.models.list()
    before = FakeHubUser.asked
    client.models.list()
    assert FakeHubUser.asked == before


def test_hub_mode_needs_the_hub_url(monkeypatch):
    from pagedq.jupyter_ext.hub import HubUsers

    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(ValueError, match="JUPYTERHUB_API_URL"):
        HubUsers()


def test_pagedq_serve_hub_command(hub_served, tmp_path):
    """The command a hub admin puts in ``c.JupyterHub.services``, with the environment JupyterHub
    gives a managed service."""
    import socket

    _, _, users = hub_served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JUPYTERHUB_API_URL=users.api_url,
        JUPYTERHUB_SERVICE_URL=f"http://127.0.0.1:{port}",
        JUPYTERHUB_SERVICE_PREFIX="/services/llm/",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedq", "serve", "--hub", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/services/llm/v1" in line, line
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/services/llm/v1", api_key="tok-bob", max_retries=0
        )
        assert (
            client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2).usage.completion_tokens
            == 2
        )
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
