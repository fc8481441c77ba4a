"""``pagedq.connect()``: a notebook's handle on the shared engine.

The shared engine is the jupyter-server extension (``<base_url>pagedq/v1``), ``pagedq serve``
or the JupyterHub service; this client speaks its OpenAI-compatible API with the standard
library alone (no model, no torch in the kernel) and hands back the engine's own objects:
``generate`` returns :class:`~pagedq.outputs.RequestOutput` s and ``submit`` a
:class:`~pagedq.driver.Generation` whose outputs stream in on a thread.

It never hands back cut-off text as a result. A request ends either with every sample's
``finish_reason`` and the stream's ``[DONE]``, or with an exception: :class:`StreamInterruptedError`
when the stream breaks or ends early (or carries the server's ``error`` event — the engine died,
the server shut down), :class:`ReadTimeoutError` when nothing arrives for ``read_timeout``
seconds (the server sends keep-alives every few seconds, so silence means a dead upstream),
:class:`EngineUnavailableError` for a 503 or an unreachable server, :class:`RateLimitedError`
for a 429, ``ValueError`` (the server's message) for a 400. Cancelling a generation, or
interrupting the cell, closes its connection; the server then aborts the request.
"""

from __future__ import annotations

import contextlib
import getpass
import http.client
import itertools
import json
import os
import socket
import threading
import urllib.parse
from typing import cast

from pagedq.driver import Generation
from pagedq.options import wire_fields
from pagedq.outputs import CompletionOutput, GenerationError, RequestOutput
from pagedq.sampling_params import SamplingParams

# sampling fields sent as they are (the API's names are SamplingParams' names)
# SamplingParams fields sent under their own names, plus max_tokens (the API shapes the rest)
_FIELDS = (*wire_fields(), "max_tokens")


class _StreamState:
    """What the chunks of one stream have said so far, per sample."""

    def __init__(self, rid: str, prompt, prompt_ids: list[int], chat: bool, n: int):
        self.rid, self.prompt, self.prompt_ids, self.chat, self.n = rid, prompt, prompt_ids, chat, n
        self.texts: dict[int, str] = {i: "" for i in range(n)}
        self.ids: dict[int, list[int]] = {i: [] for i in range(n)}
        self.reasons: dict[int, str | None] = dict.fromkeys(range(n))

    def apply(self, chunk: dict) -> None:
        for c in chunk.get("choices", []):
            i = c["index"]
            delta = (c["delta"].get("content") or "") if self.chat else c.get("text", "")
            self.texts[i] = self.texts.get(i, "") + delta
            self.ids[i] = self.ids.get(i, []) + list(c.get("token_ids") or [])
            if c.get("finish_reason"):
                self.reasons[i] = c["finish_reason"]

    def output(self, finished: bool) -> RequestOutput:
        outs = [
            CompletionOutput(i, self.texts[i], self.ids[i], finish_reason=self.reasons[i])
            for i in range(self.n)
        ]
        return RequestOutput(self.rid, self.prompt, self.prompt_ids, outs, finished)

    def check_complete(self, done: bool) -> None:
        """A stream must end with ``[DONE]`` and a finish reason for every sample."""
        unfinished = [i for i in range(self.n) if self.reasons[i] is None]
        if not done or unfinished:
            raise StreamInterruptedError(
                "the shared engine's stream ended before the request finished "
                f"({'no [DONE]' if not done else f'samples {unfinished} have no finish_reason'}); "
                f"{sum(len(v) for v in self.ids.values())} tokens had arrived"
            )


class SharedEngineError(GenerationError):
    """The shared engine could not serve a request (the message says why)."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class EngineUnavailableError(SharedEngineError):
    """The server is unreachable, or its engine is (re)starting or shutting down (503)."""


class RateLimitedError(SharedEngineError):
    """Too many requests in flight for you or for the server (429); retry after ``retry_after`` s."""


class StreamInterruptedError(SharedEngineError):
    """The stream broke, ended before every sample finished, or carried an error event."""


class ReadTimeoutError(SharedEngineError):
    """Nothing (not even a keep-alive) arrived for ``read_timeout`` seconds."""


class SharedEngine:
    """A connection to a shared engine at ``url`` (ending in ``/v1``)."""

    def __init__(
        self, url: str, token: str | None = None, read_timeout: float = 60.0, connect_timeout: float = 10.0
    ):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/.../v1, got {url!r}")
        if not (isinstance(read_timeout, (int, float)) and read_timeout > 0):
            raise ValueError(f"read_timeout must be a number of seconds > 0, got {read_timeout!r}")
        self._parts, self.token = parts, token
        self.read_timeout, self.connect_timeout = float(read_timeout), float(connect_timeout)
        self._ids = itertools.count()
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._gens: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self.model = self.models()[0]

    def __repr__(self) -> str:
        return f"<SharedEngine {self.model!r} at {self.url}>"

    # --- HTTP ------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(cast(str, self._parts.hostname), self._parts.port, timeout=self.connect_timeout)

    def _request(self, method: str, path: str, body: dict | None = None):
        conn = self._connection()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(
                method, self._parts.path + path, json.dumps(body) if body is not None else None, headers
            )
            if conn.sock is not None:
                conn.sock.settimeout(self.read_timeout)
            resp = conn.getresponse()
        except TimeoutError:
            conn.close()
            raise ReadTimeoutError(
                f"no answer from {self.url}{path} within {self.read_timeout:.0f} s"
            ) from None
        except OSError as e:
            conn.close()
            raise EngineUnavailableError(f"cannot reach the shared engine at {self.url}: {e}") from None
        except http.client.HTTPException as e:
            conn.close()
            raise StreamInterruptedError(
                f"the shared engine at {self.url} broke the connection: {e!r}"
            ) from None
        if resp.status != 200:
            raw = resp.read()
            conn.close()
            _raise_for_status(resp, raw, f"{self.url}{path}")
        return conn, resp

    def models(self) -> list[str]:
        conn, resp = self._request("GET", "/models")
        try:
            return [m["id"] for m in json.loads(resp.read())["data"]]
        finally:
            conn.close()

    # --- generation ------------------------------------------------------------------------

    def _body(self, params: SamplingParams | None) -> dict:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise ValueError("logprobs are not returned by pagedq.connect(); ask the HTTP API for them")
        body = {f: getattr(params, f) for f in _FIELDS}
        body.update(stop=params.stop_strings or None, user=getpass.getuser(), model=self.model, stream=True)
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        return body

    def submit(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        messages: list[dict] | None = None,
    ) -> Generation:
        """Start one generation (a prompt, or chat ``messages``); its outputs stream in on a thread.
        ``ValueError`` with the server's message on bad input."""
        body = self._body(params)
        if messages is not None:
            body["messages"], path = messages, "/chat/completions"
        else:
            body["prompt"], path = prompt, "/completions"
        conn, resp = self._request("POST", path, body)
        rid = f"shared-{next(self._ids)}"
        gen = Generation(self, rid)
        with self._lock:
            self._conns[rid], self._gens[rid] = conn, gen
        text = prompt if isinstance(prompt, str) else None
        ids = prompt if isinstance(prompt, list) else []
        threading.Thread(
            target=self._read, args=(rid, gen, resp, text, ids, messages is not None, body["n"]), daemon=True
        ).start()
        return gen

    def _read(self, rid, gen, resp, prompt, prompt_ids, chat: bool, n: int) -> None:
        state = _StreamState(rid, prompt, prompt_ids, chat, n)
        try:
            done = False
            for event, data in _events(resp):
                if event == "error":
                    raise StreamInterruptedError(
                        f"the shared engine ended the stream with an error: {_message(data)}"
                    )
                if data == "[DONE]":
                    done = True
                    break
                state.apply(json.loads(data))
                gen._deliver(state.output(False))
            state.check_complete(done)
            gen._deliver(state.output(True))
        except Exception as e:
            if gen.done.is_set():  # cancelled: closing the socket under the reader is not an error
                return
            gen._finish(self._client_error(e))
        finally:
            with self._lock:
                conn = self._conns.pop(rid, None)
                self._gens.pop(rid, None)
            if conn is not None:
                conn.close()

    def _client_error(self, e: Exception) -> SharedEngineError:
        if isinstance(e, TimeoutError):
            return ReadTimeoutError(
                f"nothing arrived from the shared engine for {self.read_timeout:.0f} s (read_timeout); "
                "the server or its proxy is gone"
            )
        if isinstance(e, SharedEngineError):
            return e
        return StreamInterruptedError(f"the shared engine's stream broke: {e!r}")

    def abort(self, request_id: str) -> None:
        """Close the request's connection: the server aborts it and frees its blocks."""
        with self._lock:
            conn, gen = self._conns.pop(request_id, None), self._gens.pop(request_id, None)
        if gen is not None and gen.latest is not None:
            final = gen.latest
            for c in final.outputs:
                c.finish_reason = c.finish_reason or "abort"
            final.finished = True
            gen._deliver(final)
        if gen is not None:
            gen._finish()
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    def generate(
        self, prompts: str | list, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Like ``LLM.generate``: every prompt through the shared engine, outputs in order."""
        prompts = (
            [prompts]
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
            else list(prompts)
        )
        plist = params if isinstance(params, list) else [params] * len(prompts)
        gens = []
        try:
            for p, sp in zip(prompts, plist):
                gens.append(self.submit(p, sp))
            return [g.result() for g in gens]
        except BaseException:
            for g in gens:
                g.cancel()
            raise

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        return self.submit(params=params, messages=messages).result()


def _events(resp):
    """Server-sent events of ``resp`` as (event, data) pairs; comments (keep-alives) skipped."""
    event, data = None, []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _message(raw) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))[:500]


def _raise_for_status(resp, raw: bytes, where: str) -> None:
    msg, status = _message(raw), resp.status
    retry = resp.getheader("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    if status == 400:
        raise ValueError(msg)
    if status == 429:
        raise RateLimitedError(f"429 from {where}: {msg}", status, retry_after)
    if status == 503:
        raise EngineUnavailableError(f"503 from {where}: {msg}", status, retry_after)
    raise SharedEngineError(f"{status} from {where}: {msg}", status, retry_after)


def _discover() -> tuple[str, str | None]:
    """The URL and token of the Jupyter server that runs this kernel."""
    if os.environ.get("PAGEDQ_URL"):  # under JupyterHub the user's own hub token is the key
        return os.environ["PAGEDQ_URL"], os.environ.get("PAGEDQ_TOKEN") or os.environ.get(
            "JUPYTERHUB_API_TOKEN"
        )
    try:
        from jupyter_server.serverapp import list_running_servers

        servers = list(list_running_servers())
    except ImportError:
        servers = []
    mine = [s for s in servers if s.get("pid") == os.getppid()] or (servers if len(servers) == 1 else [])
    if not mine:
        found = ", ".join(s.get("url", "?") for s in servers) or "none"
        raise ValueError(
            f"cannot tell which Jupyter server runs this kernel (running servers: {found}); "
            "pass pagedq.connect(url='http://host:port/pagedq/v1', token=...) or set PAGEDQ_URL / PAGEDQ_TOKEN"
        )
    s = mine[0]
    return s["url"].rstrip("/") + "/pagedq/v1", s.get("token") or None


def connect(url: str | None = None, token: str | None = None, read_timeout: float = 60.0) -> SharedEngine:
    """Connect to the shared engine: by default, the pagedq extension of the Jupyter server that
    runs this kernel (found from the server's runtime file; or ``PAGEDQ_URL`` / ``PAGEDQ_TOKEN``).
    ``url`` may also point at ``pagedq serve`` (``http://host:8000/v1``, ``token`` = its API key).
    ``read_timeout``: seconds of silence (no token, no keep-alive) after which a request fails."""
    if url is None:
        url, found = _discover()
        token = token if token is not None else found
    return SharedEngine(url, token, read_timeout=read_timeout)
