"""JupyterHub service mode (``pagedq serve --hub``): users are who the Hub API says own the
request's token, they share the engine fairly, and nobody gets in without a hub token. The Hub
is a stand-in that answers ``GET /hub/api/user`` as JupyterHub does."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from .conftest import AppThread, ServeProcess, free_port

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
def hub_served(tmp_path_factory):
    hub = AppThread(fake_hub())
    hub.api_url = f"http://127.0.0.1:{hub.port}/hub/api"
    port = free_port()
    env = {
        "JUPYTERHUB_API_URL": hub.api_url,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/llm/",
    }
    srv = ServeProcess("--hub", env=env, tmp=tmp_path_factory.mktemp("hub"))
    srv.start()
    base = f"http://127.0.0.1:{port}/services/llm/v1"
    yield srv, base, hub, port
    srv.stop()
    hub.stop()


def served_users(port: int, token: str) -> dict[str, float]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/services/llm/v1/metrics", headers={"Authorization": f"token {token}"}
    )
    text = urllib.request.urlopen(req).read().decode()
    return {
        ln.split('user="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("pagedq_user_served_tokens{")
    }


def test_hub_users_share_one_engine(hub_served):
    _, base, _, port = hub_served
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
    served = served_users(port, "tok-alice")
    assert served.get("alice", 0) > 0 and served.get("bob", 0) > 0 and "mallory" not in served


def test_no_hub_token_no_service(hub_served):
    _, base, _, _ = hub_served
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
    from pagedq.jupyter_ext.hub import HubIdentity

    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(ValueError, match="JUPYTERHUB_API_URL"):
        HubIdentity()
