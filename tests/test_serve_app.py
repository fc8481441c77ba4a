"""The serving app in this process (its HTTP server on a thread, the engine in its supervised
worker process): the quick coverage of the OpenAI-compatible API, its errors, streams,
identity, health and the generated document. ``tests/test_openai_api.py`` and
``tests/test_serve_faults.py`` run the same API as a real ``pagedq serve`` (slow)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from pagedq import LLM, SamplingParams, connect

from .conftest import AppThread

KEY = "in-process-key"
PROMPT = "def main(argv):\n    "


@pytest.fixture(scope="module")
def app():
    from pagedq.serve.app import make_app, make_state
    from pagedq.serve.identity import ApiKeys

    state = make_state(
        "pagedq-tiny", {"dtype": "float32", "max_model_len": 256}, identity=ApiKeys.single(KEY)
    )
    state.supervisor.start()
    assert state.supervisor.wait_ready(120), state.supervisor.last_error
    thread = AppThread(make_app(state))
    thread.url = f"http://127.0.0.1:{thread.port}"
    yield thread
    thread.stop()
    state.supervisor.close()


def post(app, path: str, body: dict | bytes, key: str | None = KEY) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(app.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_completion_and_stream_equal_generate(app):
    with LLM("pagedq-tiny", dtype="float32") as llm:
        ref = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    status, body = post(app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    assert status == 200
    reply = json.loads(body)
    assert reply["choices"][0]["token_ids"] == ref.token_ids
    assert reply["usage"]["completion_tokens"] == 10
    status, body = post(
        app, "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
    )
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    remote = connect(app.url + "/v1", KEY)
    out = remote.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10))[0]
    assert out.outputs[0].token_ids == ref.token_ids
    status, body = post(
        app, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    assert status == 200
    assert json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": [1, "a"], "max_tokens": 2}, "prompt"),
        ({"prompt": "x", "temperature": "NaN"}, "temperature"),
        ({"prompt": "x", "top_p": 2}, "top_p"),
        ({"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids"),
        (b"\xff\xfe not json", "body"),
    ],
)
def test_bad_requests_get_an_openai_shaped_400(app, body, needle):
    status, reply = post(app, "/v1/completions", body)
    assert status == 400
    error = json.loads(reply)["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in (error["message"] + str(error.get("param")))


def test_identity_health_metrics_and_document(app):
    assert post(app, "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
    assert post(app, "/v1/completions", {"prompt": "x"}, key="wrong")[0] == 401
    for path in ("/health", "/ready"):
        with urllib.request.urlopen(app.url + path) as r:
            assert json.load(r)["status"] in ("ok", "ready")
    req = urllib.request.Request(app.url + "/v1/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    assert "pagedq_kv_blocks_in_use" in text
    with urllib.request.urlopen(app.url + "/v1/openapi.json") as r:
        doc = json.load(r)
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"repetition_penalty", "stop_token_ids", "min_tokens"} <= set(props)  # from SamplingParams
