"""The OpenAI-compatible API of ``pagedq serve`` (a real server and engine process), driven by the
official ``openai`` client and by raw HTTP: same tokens as ``LLM.generate``, streaming, chat,
logprobs, who the requests are attributed to, errors, a client that hangs up, metrics and the
generated OpenAPI document."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from pagedq import LLM, SamplingParams

from .conftest import ServeProcess

# starts a real `pagedq serve` (tests/test_serve_app.py is the quick version): part of
# `make test`, not of the quick default selection
pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

KEY = "sk-test"
PROMPT = "import os\ndef main("


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServeProcess("--api-key", KEY, tmp=tmp_path_factory.mktemp("serve")).start()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm():
    with LLM("pagedq-tiny", dtype="float32") as llm:
        yield llm


def metrics(server, key: str | None = KEY) -> dict[str, float]:
    req = urllib.request.Request(
        server.url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and line[0] != "#"
    }


def test_completion_equals_generate_and_counts_usage(client, llm):
    ref = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.model == "pagedq-tiny"
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    # several prompts (one as token ids) with n=2 seeded samples: choices indexed prompt-major
    r = client.completions.create(
        model="pagedq-tiny", prompt=[PROMPT, ref.prompt_token_ids], max_tokens=5, n=2, seed=3, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[2].text
    assert r.choices[1].text == r.choices[3].text


def test_streamed_completion_concatenates_to_the_whole(client):
    whole = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model="pagedq-tiny", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_a_streamed_stop_string_is_never_sent_and_taken_back(client, llm):
    """The text that a stop string may still cut is held back until it is decided."""
    ref = (
        llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    )
    stop = ref[10:14]  # a string the greedy text reaches
    want = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0]
    chunks = list(
        client.completions.create(
            model="pagedq-tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want.outputs[0].text
    assert stop not in want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_equals_llm_chat_streamed_or_not(client, llm):
    messages = [{"role": "user", "content": "Write a loop over a list."}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    r = client.chat.completions.create(model="pagedq-tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref
    stream = client.chat.completions.create(
        model="pagedq-tiny", messages=messages, max_completion_tokens=16, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ref
    # content given as text parts
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Write a loop "}, {"type": "text", "text": "over a list."}],
        }
    ]
    r = client.chat.completions.create(model="pagedq-tiny", messages=parts, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == ref


def test_logprobs_whole_and_streamed(client):
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) >= 3 for t in lp.top_logprobs)
    chunks = list(
        client.completions.create(
            model="pagedq-tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, stream=True
        )
    )
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset
    r = client.chat.completions.create(
        model="pagedq-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


def test_a_key_is_one_user_and_the_body_user_is_not_the_key(client, server):
    client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2, user="mallory")
    m = metrics(server)
    assert m['pagedq_user_generated_tokens_total{model="pagedq-tiny",user="default"}'] > 0
    assert not any('user="mallory"' in k for k in m)


def test_errors_are_openai_shaped_and_the_engine_keeps_serving(client, server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="pagedq-tiny", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        client.completions.create(model="pagedq-tiny", prompt=PROMPT, echo=True)
    with pytest.raises(openai.BadRequestError, match="messages: list should have at least 1 item"):
        client.chat.completions.create(model="pagedq-tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_model_len is"):
        client.completions.create(model="pagedq-tiny", prompt="x " * 5000, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="serves 'pagedq-tiny'"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == ["pagedq-tiny"]
    r = client.completions.create(model="pagedq-tiny", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_a_client_that_hangs_up_frees_its_blocks(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    before = metrics(server)['pagedq_generated_tokens_total{model="pagedq-tiny"}']
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        m = metrics(server)
        if (
            m['pagedq_num_running{model="pagedq-tiny"}'] == 0
            and m['pagedq_kv_blocks_in_use{model="pagedq-tiny"}'] == 0
        ):
            break
        time.sleep(0.1)
    assert m['pagedq_kv_blocks_in_use{model="pagedq-tiny"}'] == 0
    assert m['pagedq_prompts_in_flight{model="pagedq-tiny"}'] == 0
    assert m['pagedq_generated_tokens_total{model="pagedq-tiny"}'] < before + 1500  # stopped, not finished


def test_metrics_in_prometheus_text(client, server):
    client.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2)
    m = metrics(server)
    assert m['pagedq_generated_tokens_total{model="pagedq-tiny"}'] > 0
    assert m['pagedq_kv_blocks_in_use{model="pagedq-tiny"}'] == 0
    assert m['pagedq_engine_ready{model="pagedq-tiny"}'] == 1.0
    assert (
        m['pagedq_time_to_first_token_seconds_bucket{model="pagedq-tiny",le="+Inf"}']
        == (m['pagedq_time_to_first_token_seconds_count{model="pagedq-tiny"}'])
    )
    assert m['pagedq_http_errors_total{model="pagedq-tiny",status="400"}'] >= 1
    with pytest.raises(urllib.error.HTTPError) as e:
        metrics(server, key=None)
    assert e.value.code == 401


def test_health_ready_and_the_generated_openapi_document(server):
    for path, want in (("/health", {"status": "ok"}), ("/ready", {"status": "ready"})):
        with urllib.request.urlopen(server.base + path) as r:  # no key needed
            assert want.items() <= json.load(r).items()
    with urllib.request.urlopen(server.url + "/openapi.json") as r:
        doc = json.load(r)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {
        "/v1/completions",
        "/v1/chat/completions",
    }
    schema = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert (
        schema["temperature"]["anyOf"][0]["minimum"] == 0
        if "anyOf" in schema["temperature"]
        else (schema["temperature"]["minimum"] == 0)
    )
    assert schema["n"]["minimum"] == 1
    assert doc["security"] == [{"bearer": []}]


def test_trusted_body_users_share_fairly(tmp_path):
    """--trust-request-user: the operator opts in to the body's user as the fair-share key."""
    srv = ServeProcess("--trust-request-user", "--max-model-len", "64", tmp=tmp_path).start()
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        c.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2, user="alice")
        c.completions.create(model="pagedq-tiny", prompt="x", max_tokens=2)
        m = metrics(srv, key=None)
        assert m['pagedq_user_generated_tokens_total{model="pagedq-tiny",user="alice"}'] > 0
        assert m['pagedq_user_generated_tokens_total{model="pagedq-tiny",user="anonymous"}'] > 0
    finally:
        assert srv.stop() == 0
