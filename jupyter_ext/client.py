"""``pagedq.connect()``: a notebook's handle on the shared engine.

The shared engine is the jupyter-server extension (``<base_url>pagedq/v1``) or ``pagedq serve``;
this client speaks its OpenAI-compatible API with the standard library alone (no model is loaded
in the kernel) and hands back the same objects as the in-kernel engine: ``generate`` returns
:class:`~pagedq.outputs.RequestOutput` s and ``submit`` a :class:`Generation` whose outputs
stream in (a thread reads the server-sent events). ``%%generate --shared`` uses it. Cancelling a
generation (or interrupting the kernel) closes its connection, which aborts the request on the
server and frees its blocks.
"""

from __future__ import annotations

import getpass
import http.client
import itertools
import json
import os
import threading
import urllib.parse

from pagedq.driver import Generation
from pagedq.outputs import CompletionOutput, RequestOutput
from pagedq.sampling_params import SamplingParams

_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "max_tokens", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
    "include_stop_str_in_output",
)  # fmt: skip


class SharedEngineError(RuntimeError):
    """The shared engine refused a request (the message is the server's) or is unreachable."""


class SharedEngine:
    """A connection to a shared engine at ``url`` (ending in ``/v1``)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600):
        self.url = url.rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port]/.../v1, got {url!r}")
        self._parts, self.token, self.timeout = parts, token, timeout
        self._ids = itertools.count()
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._gens: dict[str, Generation] = {}
        self.model = self.models()[0]

    def __repr__(self) -> str:
        return f"<SharedEngine {self.model!r} at {self.url}>"

    # --- HTTP ------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
        return cls(self._parts.hostname, self._parts.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict | None = None):
        conn = self._connection()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(
                method, self._parts.path + path, json.dumps(body) if body is not None else None, headers
            )
            resp = conn.getresponse()
        except OSError as e:
            raise SharedEngineError(f"cannot reach the shared engine at {self.url}: {e}") from None
        if resp.status != 200:
            raw = resp.read()
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw.decode(errors="replace")[:500]
            conn.close()
            if resp.status == 400:
                raise ValueError(msg)
            raise SharedEngineError(f"{resp.status} from {self.url}{path}: {msg}")
        return conn, resp

    def models(self) -> list[str]:
        conn, resp = self._request("GET", "/models")
        try:
            return [m["id"] for m in json.loads(resp.read())["data"]]
        finally:
            conn.close()

    # --- generation ------------------------------------------------------------------------

    def _body(self, params: SamplingParams | None) -> dict:
        params = params or SamplingParams()
        if params.logprobs is not None or params.prompt_logprobs is not None:
            raise ValueError("logprobs are not streamed to pagedq.connect(); ask the HTTP API without stream")
        body = {f: getattr(params, f) for f in _FIELDS}
        body.update(stop=params._stop_list or None, user=getpass.getuser(), model=self.model, stream=True)
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
        self._conns[rid], self._gens[rid] = conn, gen
        text = prompt if isinstance(prompt, str) else None
        ids = prompt if isinstance(prompt, list) else []
        threading.Thread(
            target=self._read, args=(rid, gen, resp, text, ids, messages is not None), daemon=True
        ).start()
        return gen

    def _read(self, rid, gen, resp, prompt, prompt_ids, chat: bool) -> None:
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        reasons: dict[int, str | None] = {}

        def output(finished: bool) -> RequestOutput:
            outs = [
                CompletionOutput(
                    i, texts[i], ids[i], finish_reason=reasons.get(i) or ("abort" if finished else None)
                )
                for i in sorted(texts)
            ]
            return RequestOutput(rid, prompt, prompt_ids, outs, finished)

        try:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                for c in json.loads(data).get("choices", []):
                    i = c["index"]
                    delta = c["delta"].get("content") or "" if chat else c.get("text", "")
                    texts[i] = texts.get(i, "") + delta
                    ids[i] = ids.get(i, []) + list(c.get("token_ids") or [])
                    if c.get("finish_reason"):
                        reasons[i] = c["finish_reason"]
                gen._deliver(output(False))
            gen._deliver(output(True))
        except Exception as e:  # a cancel closes the socket under the reader: that is not an error
            if not gen.done.is_set():  # not a cancel: the connection broke
                gen._finish(SharedEngineError(f"the shared engine's stream broke: {e}"))
        finally:
            self._conns.pop(rid, None)
            self._gens.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Close the request's connection: the server aborts it and frees its blocks."""
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
            try:
                conn.sock.shutdown(2)
            except OSError:
                pass
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


def _discover() -> tuple[str, str | None]:
    """The URL and token of the Jupyter server that runs this kernel."""
    if os.environ.get("PAGEDQ_URL"):  # under JupyterHub the user's own hub token is the key
        return os.environ["PAGEDQ_URL"], os.environ.get("PAGEDQ_TOKEN") or os.environ.get(
            "JUPYTERHUB_API_TOKEN"
        )
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        list_running_servers = None
    servers = list(list_running_servers()) if list_running_servers else []
    mine = [s for s in servers if s.get("pid") == os.getppid()] or (servers if len(servers) == 1 else [])
    if not mine:
        found = ", ".join(s.get("url", "?") for s in servers) or "none"
        raise ValueError(
            f"cannot tell which Jupyter server runs this kernel (running servers: {found}); "
            "pass pagedq.connect(url='http://host:port/pagedq/v1', token=...) or set PAGEDQ_URL / PAGEDQ_TOKEN"
        )
    s = mine[0]
    return s["url"].rstrip("/") + "/pagedq/v1", s.get("token") or None


def connect(url: str | None = None, token: str | None = None) -> SharedEngine:
    """Connect to the shared engine: by default, the pagedq extension of the Jupyter server that
    runs this kernel (found from the server's runtime file; or ``PAGEDQ_URL`` / ``PAGEDQ_TOKEN``).
    ``url`` may also point at ``pagedq serve`` (``http://host:8000/v1``, ``token`` = its API key)."""
    if url is None:
        url, found = _discover()
        token = token if token is not None else found
    return SharedEngine(url, token)
