"""The hub service's identity (``HubIdentity`` on JupyterHub's ``HubOAuth``) against a stand-in Hub
API, for what a real hub makes hard to provoke: cached answers, a refusal that must not last, a
hub that answers garbage or not at all. The real JupyterHub end to end is tests/test_jupyterhub.py."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import ClassVar

import pytest

from .conftest import AppThread, free_port

pytest.importorskip("jupyterhub", reason="hub mode needs jupyterhub (pip install 'pagedq[hub]')")

import tornado.web

SCOPE = "access:services!service=pagedq"
VALID = {"tok-alice": ("alice", [SCOPE, "read:users:name!user=alice"]), "tok-carol": ("carol", ["self"])}


class FakeHubUser(tornado.web.RequestHandler):
    """``GET /hub/api/user`` as JupyterHub answers it."""

    asked: ClassVar[list[str]] = []
    garbage = False

    def get(self):
        token = self.request.headers.get("Authorization", "").removeprefix("token ")
        FakeHubUser.asked.append(token)
        if FakeHubUser.garbage:
            self.finish("<html>not json</html>")
            return
        if token not in VALID:
            raise tornado.web.HTTPError(403)
        name, scopes = VALID[token]
        self.finish(json.dumps({"name": name, "kind": "user", "scopes": scopes}))


def identity_app(identity) -> tornado.web.Application:
    from pagedq.serve.errors import APIError

    class WhoAmI(tornado.web.RequestHandler):
        async def get(self):
            try:
                self.finish({"user": await identity.authenticate(self)})
            except APIError as e:
                self.set_status(e.status)
                self.finish(e.body())

    return tornado.web.Application([("/whoami", WhoAmI)], cookie_secret="x" * 32)


@pytest.fixture(scope="module")
def hub():
    fake = AppThread(tornado.web.Application([("/hub/api/user", FakeHubUser)]))
    yield f"http://127.0.0.1:{fake.port}/hub/api"
    fake.stop()


def make_identity(api_url: str):
    from pagedq.jupyter_ext.hub import HubIdentity, hub_auth_class

    auth = hub_auth_class()(
        api_url=api_url, api_token="service-token", access_scopes={SCOPE}, cache_max_age=60
    )
    return HubIdentity(auth)


@pytest.fixture
def ask(hub):
    identity = make_identity(hub)
    app = AppThread(identity_app(identity))

    def call(token: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"token {token}"} if token else {}
        req = urllib.request.Request(f"http://127.0.0.1:{app.port}/whoami", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    FakeHubUser.asked.clear()
    FakeHubUser.garbage = False
    yield call
    app.stop()


def test_users_need_the_access_scope(ask):
    assert ask("tok-alice") == (200, {"user": "alice"})
    status, body = ask("tok-carol")
    assert status == 403
    assert "user 'carol' may not use this service" in body["error"]["message"]
    for token in ("tok-eve", None):
        status, body = ask(token)
        assert status == 403
        assert body["error"]["code"] == "login_required"


def test_answers_are_cached_and_refusals_only_briefly(ask, monkeypatch):
    import pagedq.jupyter_ext.hub as hub_mod

    ask("tok-alice")
    ask("tok-alice")
    assert FakeHubUser.asked.count("tok-alice") == 1  # cached as JupyterHub intends
    monkeypatch.setattr(hub_mod, "REFUSAL_SECONDS", 0.3)
    assert ask("tok-new")[0] == 403
    VALID["tok-new"] = ("dana", [SCOPE])  # the token becomes valid (a role granted, a token made)
    try:
        assert ask("tok-new")[0] == 403  # the refusal is remembered for a moment: no hub call per request
        assert FakeHubUser.asked.count("tok-new") == 1
        time.sleep(0.4)
        assert ask("tok-new") == (200, {"user": "dana"})
    finally:
        del VALID["tok-new"]


def test_a_broken_or_missing_hub_is_a_503_without_its_address(ask, hub):
    FakeHubUser.garbage = True
    status, body = ask("tok-garbage")
    assert status == 503
    assert "hub cannot tell who you are" in body["error"]["message"]
    assert "127.0.0.1" not in body["error"]["message"]
    gone = AppThread(identity_app(make_identity(f"http://127.0.0.1:{free_port()}/hub/api")))
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{gone.port}/whoami", headers={"Authorization": "token tok-alice"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        body = json.load(e.value)
        assert e.value.code == 503
        assert "127.0.0.1" not in body["error"]["message"]
    finally:
        gone.stop()


def test_hub_mode_runs_as_a_hub_service(monkeypatch):
    from pagedq.jupyter_ext.hub import HubIdentity

    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    with pytest.raises(ValueError, match="JUPYTERHUB_API_TOKEN, JUPYTERHUB_API_URL"):
        HubIdentity()
