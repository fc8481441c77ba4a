"""The OpenAI-compatible API (``pagedq serve``, ``pagedq.jupyter_ext.openai_api``), driven by the
official ``openai`` client and by raw HTTP: same tokens as ``LLM.generate``, streaming, chat,
logprobs, users reaching the fair-share scheduler, errors, and a client that hangs up."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from pagedq import LLM, SamplingParams

openai = pytest.importorskip("openai")
tornado = pytest.importorskip("tornado")


class Server:
    """The API app on a free port, its IOLoop on a thread of this process."""

    def __init__(self, llm: LLM, api_key: str | None = None, extra_apps=(), hub=None):
        import tornado.httpserver
        import tornado.netutil
        from pagedq.jupyter_ext.openai_api import make_app

        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            self.port = sockets[0].getsockname()[1]
            tornado.httpserver.HTTPServer(make_app(llm, "pagedq-tiny", api_key, hub=hub)).add_sockets(sockets)
            self.extra_ports = []
            for app in extra_apps:  # e.g. a fake Hub API on the same loop
                more = tornado.netutil.bind_sockets(0, "127.0.0.1")
                tornado.httpserver.HTTPServer(app).add_sockets(more)
                self.extra_ports.append(more[0].getsockname()[1])
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def served():
    llm = LLM("pagedq-tiny", dtype="float32", scheduling_policy="fair")
    server = Server(llm, api_key="sk-test")
    client = openai.OpenAI(base_url=server.url, api_key="sk-test", max_retries=0)
    yield llm, server, client
    server.stop()
    llm.close()


PROMPT = "import os\ndef main("


def test_completion_equals_generate_and_counts_usage(served):
    llm, _, client = served
    ref = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "pagedq-tiny"
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    # several prompts (one as token ids) with n=2 seeded samples: choices indexed prompt-major
    r = client.completions.create(
        model="pagedq-tiny", prompt=[PROMPT, ref.prompt_token_ids], max_tokens=5, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[2].text and r.choices[1].text == r.choices[3].text  # same seeds


def test_streamed_completion_concatenates_to_the_whole(served):
    _, _, client = served
    whole = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="pagedq-tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_equals_llm_chat_streamed_or_not(served):
    llm, _, client = served
    messages = [{"role": "user", "content": "Write a loop over a list."}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    r = client.chat.completions.create(model="pagedq-tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref
    stream = client.chat.completions.create(
        model="pagedq-tiny", messages=messages, max_completion_tokens=16, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ref


def test_logprobs(served):
    _, _, client = served
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text and all(len(t) >= 3 for t in lp.top_logprobs)
    r = client.chat.completions.create(
        model="pagedq-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_the_user_field_reaches_the_fair_scheduler(served):
    llm, _, client = served
    client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2, user="alice")
    assert llm.engine.scheduler.policy.served.get("alice", 0) > 0


def test_errors_are_openai_shaped_and_the_engine_keeps_serving(served):
    llm, server, client = served
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="pagedq-tiny", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        client.completions.create(model="pagedq-tiny", prompt=PROMPT, echo=True)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="pagedq-tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_model_len is"):
        client.completions.create(model="pagedq-tiny", prompt="x " * 5000, max_tokens=2)
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == ["pagedq-tiny"]
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert not llm.engine.has_unfinished_requests()


def test_a_client_that_hangs_up_frees_its_blocks(served, monkeypatch):
    llm, server, _ = served
    driver, aborted = llm._driver, []
    abort = driver.abort
    monkeypatch.setattr(driver, "abort", lambda rid: (aborted.append(rid), abort(rid)))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True})
    conn.request(
        "POST",
        "/v1/completions",
        body,
        {"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while llm.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert not llm.engine.has_unfinished_requests() and len(aborted) == 1
    bm = llm.engine.block_manager
    bm.check()
    assert bm.num_used_blocks == 0  # every block free (prompt blocks may stay cached, evictable)


def test_pagedq_serve_command(tmp_path):
    """``pagedq serve`` on the bundled model: answers, and Ctrl-C stops it cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PAGEDQ_API_KEY="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedq", "serve", "--port", str(port), "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.chat.completions.create(
            model="pagedq-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.usage.completion_tokens <= 4 and r.choices[0].message.role == "assistant"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_metrics_in_prometheus_text(served):
    llm, server, client = served
    client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2, user='bo"b')
    req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": "Bearer sk-test"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    stats = llm.engine.stats()
    assert values['pagedq_generated_tokens_total{model="pagedq-tiny"}'] == stats["generated_tokens"] > 0
    assert values['pagedq_num_kv_blocks{model="pagedq-tiny"}'] == stats["num_kv_blocks"]
    assert values['pagedq_kv_blocks_in_use{model="pagedq-tiny"}'] == 0
    assert values['pagedq_user_served_tokens{model="pagedq-tiny",user="bo\\"b"}'] > 0  # label escaped
    assert "# TYPE pagedq_num_preemptions_total counter" in text
    ttft = llm.engine.latency["time_to_first_token_seconds"]
    assert (
        values['pagedq_time_to_first_token_seconds_bucket{model="pagedq-tiny",le="+Inf"}'] == ttft.count > 0
    )
    assert values['pagedq_time_to_first_token_seconds_count{model="pagedq-tiny"}'] == ttft.count
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/metrics")
    assert e.value.code == 401
