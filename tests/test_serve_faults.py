"""The shared engine survives what users send and what crashes: a fault suite against a real
``pagedq serve`` (server process + engine process) on loopback, bounded in time.

Every malformed request gets a 400 naming the field while other users' streams finish with
exactly the tokens they produce alone; ``kill -9`` of the engine process ends every request in
flight with an explicit error, ``/ready`` turns false and true again and the next request works;
a stream whose upstream dies through a proxy fails at the client; ``pagedq.connect()`` raises on
every kind of cut-off stream; limits answer 400 / 429; SIGTERM drains; the server process never
loads torch or a tokenizer."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import pagedq
from pagedq import LLM, SamplingParams
from pagedq.serve.client import (
    EngineUnavailableError,
    RateLimitedError,
    ReadTimeoutError,
    StreamInterruptedError,
)

from .conftest import AppThread, ServeProcess, child_pids, free_port, pid_alive

# starts real `pagedq serve` processes and kills them: part of `make test`, not of the quick
# default selection
pytestmark = pytest.mark.slow

KEYS = {"key-alice": "alice", "key-bob": "bob", "key-carol": "carol"}
PROMPTS = {"alice": "def parse(args):\n    ", "bob": "class Config:\n", "carol": "for i in range("}


def keys_file(tmp_path) -> str:
    path = tmp_path / "keys.txt"
    path.write_text("".join(f"{k} {u}\n" for k, u in KEYS.items()))
    return str(path)


def key_of(user: str) -> str:
    return next(k for k, u in KEYS.items() if u == user)


def post(url: str, body, key: str | None = None, timeout: float = 30) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def stream(
    port: int, path: str, body: dict, key: str | None, timeout: float = 30, stop_after: int | None = None
):
    """A streamed request's events: (token ids, finish reasons, saw [DONE], error event or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn.request("POST", path, json.dumps({**body, "stream": True}), headers)
    resp = conn.getresponse()
    ids, reasons, done, error, event = [], [], False, None, None
    try:
        assert resp.status == 200, resp.read()
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data: "):
                data = line[6:]
                if event == "error":
                    error = json.loads(data)["error"]
                elif data == "[DONE]":
                    done = True
                else:
                    for c in json.loads(data)["choices"]:
                        ids += c["token_ids"]
                        if c["finish_reason"]:
                            reasons.append(c["finish_reason"])
                if stop_after is not None and len(ids) >= stop_after:
                    break
    finally:
        conn.close()
    return ids, reasons, done, error


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    srv = ServeProcess(
        "--api-keys", keys_file(tmp), "--max-model-len", "512", "--max-inflight-per-user", "4", "--max-queued", "6",
        tmp=tmp,
    ).start()  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alone():
    """The greedy tokens each user's prompt produces alone (in-process engine, same model)."""
    with LLM("pagedq-tiny", dtype="float32", max_model_len=512) as llm:
        sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
        return {u: llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for u, p in PROMPTS.items()}


def engine_metric(srv, name: str, key: str | None = "key-alice") -> float:
    req = urllib.request.Request(
        srv.url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


NAN = b"NaN"
MALFORMED = [  # (path, body, what the message must name) — the reproductions and more
    ("/v1/completions", {"prompt": [1, "a"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [1, None]}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", 5]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2.5, 7]}, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": "x"},
        "top_logprobs",
    ),
    ("/v1/completions", {"prompt": "x", "logit_bias": [1]}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", b"\xff\xfe\x00{", "not valid JSON"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "JSON object"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"text": 1}]}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
        "content",
    ),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": "x"}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "n": True}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "max_n"),
    ("/v1/completions", {"prompt": ["x"] * 33}, "max_prompts"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "max_logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "max_stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ("/v1/completions", {"prompt": "x" * (5 * 2**20)}, "max_model_len"),  # 5 MB, tokenized in the engine
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "pad": "y" * (9 * 2**20)}, "max_body_bytes"),
]


def test_malformed_requests_get_400_while_other_users_streams_are_exact(server, alone):
    before = engine_metric(server, "pagedq_num_requests_total")
    results, threads = {}, []
    for user, prompt in PROMPTS.items():
        body = {
            "model": "pagedq-tiny",
            "prompt": prompt,
            "max_tokens": 48,
            "temperature": 0,
            "ignore_eos": True,
        }
        t = threading.Thread(
            target=lambda u=user, b=body: results.__setitem__(
                u, stream(server.port, "/v1/completions", b, key_of(u))
            )
        )
        t.start()
        threads.append(t)
    for path, body, needle in MALFORMED:
        status, _headers, reply = post(server.base + path, body, "key-bob")
        assert status == 400, (body if isinstance(body, bytes) else str(body)[:80], reply)
        assert reply["error"]["type"] == "invalid_request_error", reply
        assert needle in reply["error"]["message"], reply
    for t in threads:
        t.join(60)
    for user, (ids, reasons, done, error) in results.items():
        assert error is None
        assert done
        assert reasons == ["length"]
        assert ids == alone[user], user
    # nothing of the malformed requests reached the engine: only the three streams did
    assert engine_metric(server, "pagedq_num_requests_total") == before + 3
    assert engine_metric(server, "pagedq_kv_blocks_in_use") == 0


def test_per_user_and_server_limits_answer_429(server):
    conns = []
    try:

        def open_stream(key):
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            body = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
            c.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {key}"})
            r = c.getresponse()
            assert r.status == 200
            assert r.readline().startswith(b"data: ")
            conns.append(c)

        for _ in range(4):
            open_stream("key-alice")
        status, headers, reply = post(
            server.url + "/completions", {"prompt": "x", "max_tokens": 2}, "key-alice"
        )
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert "max_inflight_per_user" in reply["error"]["message"]
        assert reply["error"]["type"] == "rate_limit_error"
        open_stream("key-bob")  # bob is not held back by alice's limit
        open_stream("key-bob")
        status, headers, reply = post(
            server.url + "/completions", {"prompt": "x", "max_tokens": 2}, "key-carol"
        )
        assert status == 429
        assert "max_queued" in reply["error"]["message"]
        assert "Retry-After" in headers
        conns.pop().close()  # bob hangs up: his prompt stops counting
        deadline = time.time() + 10
        while time.time() < deadline:
            status, _, reply = post(
                server.url + "/completions", {"prompt": "x", "max_tokens": 2}, "key-carol"
            )
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
        assert reply["usage"]["completion_tokens"] == 2
    finally:
        for c in conns:
            c.close()
    deadline = time.time() + 10
    while engine_metric(server, "pagedq_prompts_in_flight") and time.time() < deadline:
        time.sleep(0.1)


def test_kill_9_of_the_engine_fails_every_request_in_flight_and_it_comes_back(server):
    engine = server.engine_pid()
    body = {"prompt": "def f(", "max_tokens": 2000, "ignore_eos": True}
    streams, whole = {}, {}
    threads = [
        threading.Thread(
            target=lambda i=i: streams.__setitem__(
                i, stream(server.port, "/v1/completions", body, "key-alice", timeout=10)
            )
        )
        for i in range(3)
    ] + [
        threading.Thread(
            target=lambda i=i: whole.__setitem__(
                i, post(server.url + "/completions", body, "key-bob", timeout=10)
            )
        )
        for i in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while engine_metric(server, "pagedq_num_running") < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(engine, signal.SIGKILL)
    t0 = time.time()
    for t in threads:
        t.join(15)
    assert all(not t.is_alive() for t in threads)
    assert time.time() - t0 < 10
    for _ids, reasons, done, error in streams.values():
        assert error is not None
        assert "SIGKILL" in error["message"]
        assert not done
        assert not reasons
    for status, headers, reply in whole.values():
        assert status == 503
        assert "Retry-After" in headers
        assert "SIGKILL" in reply["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as e:  # not ready while it restarts
        urllib.request.urlopen(server.base + "/ready", timeout=5)
    assert e.value.code == 503
    assert json.loads(e.value.read())["status"] == "restarting"
    new = server.engine_pid()  # ready again
    assert new != engine
    assert not pid_alive(engine)
    status, _, reply = post(server.url + "/completions", {"prompt": "x", "max_tokens": 3}, "key-carol")
    assert status == 200
    assert reply["usage"]["completion_tokens"] == 3
    assert "was killed by SIGKILL; restarting it" in server.log


class Proxy:
    """A byte-for-byte TCP proxy on loopback; ``freeze()`` stops forwarding without closing."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.port = upstream_port, free_port()
        self.frozen = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def freeze(self):
        self.frozen.set()

    def close(self):
        self.sock.close()


def test_a_stream_through_a_proxy_fails_at_the_client_when_its_upstream_dies(tmp_path):
    srv = ServeProcess(tmp=tmp_path).start()
    proxy = Proxy(srv.port)
    try:
        engine = srv.engine_pid()
        remote = pagedq.connect(f"http://127.0.0.1:{proxy.port}/v1", read_timeout=30)
        gen = remote.submit("def f(", SamplingParams(max_tokens=2000, ignore_eos=True))
        while gen.latest is None or len(gen.latest.outputs[0].token_ids) < 5:
            time.sleep(0.02)
        srv.proc.kill()  # the whole server dies, mid-stream
        with pytest.raises(StreamInterruptedError, match=r"ended before the request finished|broke"):
            gen.result(timeout=10)
        deadline = time.time() + 10
        while pid_alive(engine) and time.time() < deadline:
            time.sleep(0.1)
        assert not pid_alive(engine)  # the engine process never outlives its server
    finally:
        proxy.close()
        srv.kill()


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """One sequence at a time, keep-alives every 0.3 s."""
    srv = ServeProcess(
        "--keepalive-seconds", "0.3", "--max-num-seqs", "1", tmp=tmp_path_factory.mktemp("quiet")
    ).start()
    yield srv
    srv.stop()


def test_a_silent_upstream_is_a_read_timeout_not_a_hang(quiet):
    proxy = Proxy(quiet.port)
    try:
        remote = pagedq.connect(f"http://127.0.0.1:{proxy.port}/v1", read_timeout=2)
        gen = remote.submit("def f(", SamplingParams(max_tokens=1000, ignore_eos=True))
        while gen.latest is None:
            time.sleep(0.02)
        proxy.freeze()  # the path to the server goes silent without closing
        with pytest.raises(ReadTimeoutError, match="nothing arrived"):
            gen.result(timeout=15)
    finally:
        proxy.close()
    deadline = time.time() + 30  # the server saw the client go: the engine is free again
    while engine_metric(quiet, "pagedq_num_running", key=None) and time.time() < deadline:
        time.sleep(0.1)


def test_keepalives_hold_a_waiting_stream_open(quiet):
    """One sequence at a time: the second request waits in the queue longer than the client's
    read timeout, but keep-alive comments show the server alive, and it finishes."""
    remote = pagedq.connect(quiet.url, read_timeout=1.0)
    first = remote.submit("def f(", SamplingParams(max_tokens=400, ignore_eos=True))
    while first.latest is None:
        time.sleep(0.02)
    second = remote.submit("x = ", SamplingParams(max_tokens=4, ignore_eos=True))
    out = second.result(timeout=120)
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 4
    assert first.result(timeout=120).outputs[0].finish_reason == "length"


def _fake_app():
    """A stand-in server whose completions stream misbehaves as asked (by the prompt)."""
    import tornado.web

    chunk = 'data: {"choices": [{"index": 0, "text": "ab", "token_ids": [1], "finish_reason": %s}]}\n\n'

    class Models(tornado.web.RequestHandler):
        def get(self):
            self.finish({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    class Completions(tornado.web.RequestHandler):
        async def post(self):
            how = json.loads(self.request.body)["prompt"]
            if how in ("503", "429"):
                self.set_status(int(how))
                self.set_header("Retry-After", "7")
                self.finish({"error": {"message": f"busy {how}", "type": "x"}})
                return
            self.set_header("Content-Type", "text/event-stream")
            self.write(chunk % "null")
            await self.flush()
            if how == "cut":
                self.request.connection.stream.close()  # the connection drops mid-stream
                return
            if how == "error":
                self.write('event: error\ndata: {"error": {"message": "the engine died"}}\n\n')
            elif how == "no-finish":
                self.write("data: [DONE]\n\n")
            elif how == "no-done":
                self.write(chunk % '"length"')
            self.finish()

    return tornado.web.Application([("/v1/models", Models), ("/v1/completions", Completions)])


def test_connect_raises_instead_of_returning_cut_off_text():
    fake = AppThread(_fake_app())
    try:
        remote = pagedq.connect(f"http://127.0.0.1:{fake.port}/v1", read_timeout=5)
        cases = {
            "cut": (StreamInterruptedError, "ended before the request finished|broke"),
            "error": (StreamInterruptedError, "the engine died"),
            "no-finish": (StreamInterruptedError, "no finish_reason"),
            "no-done": (StreamInterruptedError, "no \\[DONE\\]"),
        }
        for how, (exc, match) in cases.items():
            with pytest.raises(exc, match=match):
                remote.generate(how, SamplingParams(max_tokens=3))
        with pytest.raises(EngineUnavailableError, match="busy 503") as e:
            remote.generate("503")
        assert e.value.retry_after == 7
        assert isinstance(e.value, pagedq.GenerationError)
        with pytest.raises(RateLimitedError, match="busy 429"):
            remote.generate("429")
    finally:
        fake.stop()
    with pytest.raises(EngineUnavailableError, match="cannot reach"):
        pagedq.connect(f"http://127.0.0.1:{free_port()}/v1")


def _drain_case(tmp_path, grace: str, max_tokens: int):
    srv = ServeProcess("--grace-seconds", grace, tmp=tmp_path).start()
    engine = srv.engine_pid()
    body = {"prompt": "def f(", "max_tokens": max_tokens, "ignore_eos": True}
    out = {}
    threads = [
        threading.Thread(
            target=lambda: out.__setitem__(
                "stream", stream(srv.port, "/v1/completions", body, None, timeout=60)
            )
        ),
        threading.Thread(
            target=lambda: out.__setitem__("whole", post(srv.url + "/completions", body, timeout=60))
        ),
    ]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while engine_metric(srv, "pagedq_num_running") < 2 and time.time() < deadline:
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = post(srv.url + "/completions", {"prompt": "x", "max_tokens": 2})
    for t in threads:
        t.join(90)
    code = srv.proc.wait(60)
    return srv, engine, out, late, code


def test_sigterm_drains_running_requests_then_stops(tmp_path):
    srv, engine, out, late, code = _drain_case(tmp_path, "60", 80)
    assert late[0] == 503
    assert "shutting down" in late[2]["error"]["message"]
    ids, reasons, done, error = out["stream"]
    assert error is None
    assert done
    assert reasons == ["length"]
    assert len(ids) == 80
    status, _, reply = out["whole"]
    assert status == 200
    assert reply["usage"]["completion_tokens"] == 80
    assert code == 0
    assert not pid_alive(engine)
    assert not child_pids(srv.proc.pid)


def test_sigterm_ends_what_outlives_the_grace_period_with_explicit_errors(tmp_path):
    _srv, engine, out, _late, code = _drain_case(tmp_path, "1", 2000)
    _ids, _reasons, done, error = out["stream"]
    assert error is not None
    assert "shutting down" in error["message"]
    assert not done
    status, _headers, reply = out["whole"]
    assert status == 503
    assert "shutting down" in reply["error"]["message"]
    assert code == 0
    assert not pid_alive(engine)


def test_the_server_process_never_loads_torch_or_a_tokenizer(server):
    """Tokenization, chat templates and the model live in the engine process: the server's event
    loop cannot be frozen by a big prompt, because the server has no tokenizer to run."""
    status, _, reply = post(
        server.url + "/completions", {"prompt": "x " * 400_000, "max_tokens": 2}, "key-alice"
    )
    assert status == 400
    assert "max_model_len" in reply["error"]["message"]
    status, _, _ = post(
        server.url + "/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "key-alice",
    )
    assert status == 200
    with open(f"/proc/{server.proc.pid}/maps") as f:
        libs = {line.split()[-1].rsplit("/", 1)[-1] for line in f if ".so" in line}
    assert not [lib for lib in libs if "torch" in lib or "tokenizers" in lib], sorted(libs)
    with open(f"/proc/{server.engine_pid()}/maps") as f:
        assert "libtorch_cpu.so" in f.read()  # the engine process has them
