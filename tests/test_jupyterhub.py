"""The hub service end to end, under a real JupyterHub with configurable-http-proxy: the documented
config (``examples/jupyterhub_config.py``) plus the test's authenticator (``DummyAuthenticator``),
spawner (``SimpleLocalProcessSpawner``) and ports.

Two users' kernels call ``pagedq.connect()`` at the same time and are served as themselves; a
user without the role, another service's token and a token without the scope get 403; a person
logged in to the hub opens the page through the OAuth flow; a hub restart with
``cleanup_servers=False`` ends an in-flight request with an explicit error, and later requests
work. JupyterHub comes from the ``hub`` extra, the proxy from npm (``make install`` installs it
where npm exists); without them the test is skipped and says why."""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from .conftest import free_port

# starts a real JupyterHub, its proxy and single-user servers: part of `make test`, not of the
# quick default selection
pytestmark = pytest.mark.slow

pytest.importorskip("jupyterhub", reason="the hub test needs jupyterhub (pip install 'pagedq[hub]')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHP = os.path.join(ROOT, ".cache", "npm", "node_modules", ".bin", "configurable-http-proxy")
if not os.path.exists(CHP):
    CHP = shutil.which("configurable-http-proxy")
if CHP is None:
    pytest.skip(
        "the hub test needs configurable-http-proxy from npm (make install puts it in .cache/npm)",
        allow_module_level=True,
    )

ADMIN = "test-admin-" + uuid.uuid4().hex
OTHER = "other-service-" + uuid.uuid4().hex


class Hub:
    """JupyterHub (with its proxy and the pagedq service) in a subprocess, on free ports."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.port, self.service_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "jupyterhub_config.py"
        self.config.write_text(
            f"""
import os, sys
os.environ.update(
    PAGEDQ_HUB_PUBLIC_URL={self.url!r},
    PAGEDQ_SERVICE_URL="http://127.0.0.1:{self.service_port}",
    PAGEDQ_ENGINE_ARGS="--dtype float32 --max-model-len 512 --grace-seconds 2",
    PAGEDQ_USERS="alice,bob",
)
exec(open({os.path.join(ROOT, "examples", "jupyterhub_config.py")!r}).read())  # the documented config
c.JupyterHub.bind_url = {self.url!r}
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.command = [{CHP!r}]
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(tmp / "home" / "{username}")!r}
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
# single-user servers without the extensions the test does not use start in half the time
c.Spawner.args = [
    "--allow-root",
    "--ServerApp.jpserver_extensions={{'jupyterlab': False, 'jupyter_lsp': False, 'notebook_shim': False, "
    "'jupyter_server_terminals': False, 'pagedq.jupyter_ext': False}}",
]
c.Spawner.start_timeout = 120
c.JupyterHub.cleanup_servers = False
c.JupyterHub.db_url = "sqlite:///{tmp / "hub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(tmp / "cookie_secret")!r}
c.JupyterHub.services += [{{"name": "test-admin", "api_token": {ADMIN!r}}}, {{"name": "other", "api_token": {OTHER!r}}}]
c.JupyterHub.load_roles += [{{
    "name": "test-admin", "services": ["test-admin"],
    "scopes": ["admin:users", "admin:servers", "access:servers", "tokens", "list:users", "read:users"],
}}]
"""
        )
        self.log = open(tmp / "hub.log", "a")  # noqa: SIM115 - the hub's log for its whole life
        self.proc = None

    def start(self) -> Hub:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(self.config)],
            cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.wait(lambda: self.api("GET", "/hub/api/") is not None, "the hub did not start")
        self.wait(self.service_ready, "the pagedq service did not become ready")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def read_log(self) -> str:
        return (self.tmp / "hub.log").read_text()[-4000:]

    def wait(self, ok, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ok():
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"{what}:\n{self.read_log()}")

    def service_ready(self) -> bool:
        with urllib.request.urlopen(self.url + "/services/pagedq/ready", timeout=5) as r:
            return json.load(r)["status"] == "ready"

    def api(self, method: str, path: str, body=None, token: str = ADMIN):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data, {"Authorization": f"token {token}"}, method=method
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else {}

    def start_server(self, user: str) -> None:
        try:
            self.api("POST", f"/hub/api/users/{user}/server")
        except urllib.error.HTTPError as e:
            if e.code != 400:  # 400: already running
                raise

    def server_ready(self, user: str) -> bool:
        server = self.api("GET", f"/hub/api/users/{user}").get("servers", {}).get("")
        return bool(server and server.get("ready"))

    def token_for(self, user: str, scopes: list[str] | None = None) -> str:
        body = {"note": "pagedq test"} if scopes is None else {"note": "pagedq test", "scopes": scopes}
        return self.api("POST", f"/hub/api/users/{user}/tokens", body)["token"]

    async def execute(self, user: str, kernel: str, code: str, timeout: float = 120) -> str:
        """Run ``code`` in ``user``'s kernel (over the kernel websocket, through the proxy)."""
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = self.url.replace("http", "ws") + f"/user/{user}/api/kernels/{kernel}/channels"
        ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {ADMIN}"}))
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": user,
            "session": msg_id,
            "version": "5.3",
        }
        content = {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
        }
        await ws.write_message(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": content,
                    "channel": "shell",
                }
            )
        )
        out = []
        try:
            while True:
                raw = await asyncio.wait_for(ws.read_message(), timeout)
                if raw is None:
                    raise RuntimeError(f"the kernel websocket of {user} closed; so far: {''.join(out)}")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    out.append(f"{msg['content']['ename']}: {msg['content']['evalue']}\n")
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(out)  # iopub's idle comes after every output (the shell reply may not)
        finally:
            ws.close()


def _cleanup_processes(tmp) -> None:
    """End the single-user servers this test's hub left running (cleanup_servers=False)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    home = str(tmp / "home")
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "jupyterhub.singleuser" in args or "ipykernel_launcher" in args:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if home.encode() not in f.read():
                        continue
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    h = Hub(tmp).start()
    try:
        for user in ("alice", "bob", "carol"):
            try:
                h.api("POST", f"/hub/api/users/{user}")
            except urllib.error.HTTPError as e:
                if e.code != 409:  # 409: exists
                    raise
        # the hub answers a start only once the server is up (or slow): start both at once
        starts = [threading.Thread(target=h.start_server, args=(u,)) for u in ("alice", "bob")]
        for t in starts:
            t.start()
        for t in starts:
            t.join(120)
        for user in ("alice", "bob"):
            h.wait(lambda u=user: h.server_ready(u), f"{user}'s server did not start")
        h.kernels = {
            u: h.api("POST", f"/user/{u}/api/kernels", {"name": "python3"})["id"] for u in ("alice", "bob")
        }
        yield h
    finally:
        h.stop()
        _cleanup_processes(tmp)


GENERATE = """
import pagedq
engine = pagedq.connect()
out = engine.generate("def parse(args):", pagedq.SamplingParams(max_tokens=12, temperature=0))[0]
print(out.outputs[0].finish_reason, len(out.outputs[0].token_ids))
"""


def metrics(hub, token: str) -> str:
    req = urllib.request.Request(
        hub.url + "/services/pagedq/v1/metrics", headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


def test_two_users_kernels_are_served_as_themselves(hub):
    async def both():
        return await asyncio.gather(*(hub.execute(u, hub.kernels[u], GENERATE) for u in ("alice", "bob")))

    assert asyncio.run(both()) == ["length 12\n", "length 12\n"]
    text = metrics(hub, hub.token_for("alice"))
    for user in ("alice", "bob"):
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("pagedq_user_generated_tokens_total{") and f'user="{user}"' in ln
        )
        assert float(line.rsplit(" ", 1)[1]) >= 12


@pytest.mark.parametrize(
    ("who", "needle"),
    [
        ("carol", "user 'carol' may not use this service"),  # no role with the access scope
        ("other-service", "service 'other' may not use this service"),
        ("alice-read-only", "user 'alice' may not use this service"),  # a token scoped without access
        ("nobody", "not logged in to the hub"),
    ],
)
def test_only_those_with_the_access_scope_are_served(hub, who, needle):
    token = {
        "carol": lambda: hub.token_for("carol"),
        "other-service": lambda: OTHER,
        "alice-read-only": lambda: hub.token_for("alice", ["read:users:name!user=alice"]),
        "nobody": lambda: None,
    }[who]()
    headers = {"Authorization": f"token {token}"} if token else {}
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    req = urllib.request.Request(hub.url + "/services/pagedq/v1/completions", body, headers)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 403
    assert needle in json.loads(e.value.read())["error"]["message"]
    assert "127.0.0.1" not in needle  # no internal address in what a caller sees


def test_a_person_logged_in_to_the_hub_opens_the_page(hub):
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    browser.open(hub.url + "/hub/login").read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    browser.open(
        hub.url + "/hub/login",
        urllib.parse.urlencode({"username": "alice", "password": "-", "_xsrf": xsrf}).encode(),
    )
    page = browser.open(hub.url + "/services/pagedq/")  # -> hub OAuth -> callback -> the page
    html = page.read().decode()
    assert page.url == hub.url + "/services/pagedq/"
    assert "Signed in as <b>alice</b>" in html
    assert re.findall(r"<h2>(.*?)</h2>", html) == ["Engine", "Queue", "KV pool", "Usage"]
    # the login cookie reads, but does not post without the XSRF token
    req = urllib.request.Request(
        hub.url + "/services/pagedq/v1/completions", b'{"prompt": "x"}', {"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        browser.open(req)
    assert e.value.code == 403
    assert "XSRF" in json.loads(e.value.read())["error"]["message"]


WAIT_IN_BACKGROUND = """
import pagedq, threading, time

engine = pagedq.connect(read_timeout=20)
# 16 samples of 508 tokens: ~7 s of work here, far beyond the 2 s grace (one sample of
# pagedq-tiny now finishes in ~1 s, inside the grace, which is a legitimate finish)
gen = engine.submit("def f(", pagedq.SamplingParams(max_tokens=1500, ignore_eos=True, n=16))
while gen.latest is None:
    time.sleep(0.05)
outcome = {}
def wait():
    try:
        out = gen.result(timeout=120)
        outcome["result"] = f"finished {len(out.outputs[0].token_ids)} tokens"
    except Exception as e:
        outcome["result"] = f"{type(e).__name__}: {e}"
threading.Thread(target=wait, daemon=True).start()
print("started")
"""


def test_a_hub_restart_ends_in_flight_requests_explicitly_and_then_serves(hub):
    assert asyncio.run(hub.execute("alice", hub.kernels["alice"], WAIT_IN_BACKGROUND)) == "started\n"
    hub.stop()  # the hub, its proxy and the pagedq service stop; alice's server and kernel stay
    hub.start()
    hub.wait(lambda: hub.server_ready("alice"), "alice's server is not back behind the hub")
    report = "import time\nwhile 'result' not in outcome: time.sleep(0.1)\nprint(outcome['result'])"
    result = asyncio.run(hub.execute("alice", hub.kernels["alice"], report))
    # the stream ended with the service's error event (it drained, then stopped) or broke with the
    # proxy: either way an exception, never the cut-off text as a result
    assert result.startswith(("StreamInterruptedError", "ReadTimeoutError")), result
    assert asyncio.run(hub.execute("alice", hub.kernels["alice"], GENERATE)) == "length 12\n"
