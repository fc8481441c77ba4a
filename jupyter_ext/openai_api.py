"""An OpenAI-compatible HTTP API over one engine: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, with server-sent-event streaming (``"stream": true``).

This is the shared face of pagedq: one engine, one continuous batch, many clients (the official
``openai`` client, LangChain, jupyter-ai, curl). The handlers are tornado's — jupyter-server's web
framework — so the same classes serve ``pagedq serve`` (a standalone tornado app, see
:func:`make_app`) and the jupyter-server extension (:mod:`pagedq.jupyter_ext.serverext`, under the
server's base URL and login). Each request is submitted to an :class:`EngineDriver` with the name
of its user, so an engine made with ``scheduling_policy="fair"`` shares itself fairly between
users. A client that disconnects mid-stream aborts its request and frees its blocks.

Request fields follow OpenAI's (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``seed``, ``presence_penalty``, ``frequency_penalty``, ``logprobs``, ``stream``,
``stream_options.include_usage``, ``user``) plus vLLM's extras (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``). Bad input gets a 400
with OpenAI's error shape and a message that names the field; the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import time
import uuid

import tornado.iostream
import tornado.web

from pagedq.driver import EngineDriver, Generation
from pagedq.sampling_params import SamplingParams

_SAMPLING_FIELDS = {
    # OpenAI's names
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop": "stop",
    "logit_bias": "logit_bias",
    # vLLM's extras
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
}
_UNSUPPORTED = {
    "echo": "echo is not supported: send the prompt text yourself",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "response_format": "response_format (JSON mode) is not supported",
}


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def sampling_params(body: dict, *, chat: bool) -> SamplingParams:
    """OpenAI request fields -> :class:`SamplingParams` (``ValueError``s become :class:`APIError`)."""
    for name, why in _UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise APIError(why, name)
    kw = {ours: body[theirs] for theirs, ours in _SAMPLING_FIELDS.items() if body.get(theirs) is not None}
    max_tokens = (
        body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens", 16)
    )
    kw["max_tokens"] = max_tokens
    if body.get("best_of") not in (None, body.get("n", 1)):
        raise APIError("best_of must equal n (pagedq returns every sample)", "best_of")
    if chat:
        if body.get("logprobs"):
            kw["logprobs"] = int(body.get("top_logprobs") or 0)
        elif body.get("top_logprobs"):
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
    elif body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
    if isinstance(kw.get("logit_bias"), dict):
        try:
            kw["logit_bias"] = {int(k): float(v) for k, v in kw["logit_bias"].items()}
        except (TypeError, ValueError):
            raise APIError(
                'logit_bias maps token ids to numbers, e.g. {"50256": -100}', "logit_bias"
            ) from None
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise APIError(str(e)) from None


class Backend:
    """The engine behind the API: a driver (an in-process :class:`EngineDriver`, or the
    extension's :class:`~pagedq.jupyter_ext.worker.RemoteDriver`) and the served model's name."""

    def __init__(self, driver, model_name: str):
        self.driver = driver
        self.model_name = model_name

    async def ensure(self) -> None:
        """Wait until the engine can take requests (the extension starts its process on demand)."""

    def chat_prompt(self, messages) -> dict:
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError("messages must be a non-empty list of {role, content} objects", "messages")
        for m in messages:  # content may be a list of parts: keep the text parts
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
        if not isinstance(self.driver, EngineDriver):
            return {"messages": messages}  # the worker process holds the tokenizer
        from pagedq.llm import chat_prompt

        try:
            return chat_prompt(self.driver.llm.get_tokenizer(), messages)
        except ValueError as e:
            raise APIError(str(e), "messages") from None

    async def metrics(self) -> str:
        """The engine's counters and gauges in Prometheus' text format."""
        from pagedq.metrics import prometheus_text

        if isinstance(self.driver, EngineDriver):
            with self.driver.lock:
                engine = self.driver.engine
                stats, users, latency = engine.stats(), engine.user_service(), copy.deepcopy(engine.latency)
        else:  # ask the worker process, off the event loop
            stats, users, latency = await asyncio.get_running_loop().run_in_executor(None, self.driver.stats)
        return prometheus_text(stats, self.model_name, users, latency)

    async def submit(self, prompt, params: SamplingParams, user: str) -> Generation:
        try:
            if isinstance(self.driver, EngineDriver):
                return self.driver.submit(prompt, params, user=user)
            # a worker process answers over a pipe: wait for its answer off the event loop
            submit = functools.partial(self.driver.submit, prompt, params, user=user)
            return await asyncio.get_running_loop().run_in_executor(None, submit)
        except ValueError as e:
            where = "messages" if isinstance(prompt, dict) and "messages" in prompt else "prompt"
            raise APIError(str(e), where) from None


async def _outputs(gen: Generation):
    """The generation's outputs on the event loop, as they come from the driver thread."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    gen.on_output(lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
    while True:
        try:
            out = await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if gen.done.is_set() and q.empty():
                if gen.error is not None:
                    raise APIError(
                        f"generation failed: {gen.error}", status=500, kind="server_error"
                    ) from None
                return
            continue
        yield out
        if out.finished:
            return


class _Handler(tornado.web.RequestHandler):
    """Shared parts: JSON in and out, errors in OpenAI's shape, the user behind a request."""

    def initialize(self, backend: Backend, api_key: str | None = None, user_of=None):
        self.backend = backend
        self.api_key = api_key
        self.user_of = user_of  # handler -> user name (the jupyter-server login), or None
        self._gens: list[Generation] = []

    def prepare(self):
        if self.api_key is not None:
            if self.request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                raise APIError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    status=401,
                    kind="authentication_error",
                )

    def check_xsrf_cookie(self):  # token-authenticated JSON API: no browser form posts
        pass

    def body(self) -> dict:
        try:
            body = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as e:
            raise APIError(f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    async def user(self, body: dict) -> str:
        """Who sends this request: the login (extension) or hub user (``--hub``) when there is
        one, which may not be overridden; else the body's ``user`` field (``pagedq serve``)."""
        if self.user_of is not None:
            user = self.user_of(self)
            return await user if inspect.isawaitable(user) else user
        user = body.get("user")
        return user if isinstance(user, str) and user else "anonymous"

    async def begin(self, *, chat: bool) -> tuple[dict, str, SamplingParams]:
        """A generation request's common start: its body, who sends it, the engine up, its params."""
        body = self.body()
        user = await self.user(body)
        await self.backend.ensure()
        return body, user, sampling_params(body, chat=chat)

    def write_error(self, status_code: int, **kwargs):
        exc = kwargs.get("exc_info", (None, None))[1]
        err = (
            exc
            if isinstance(exc, APIError)
            else APIError(self._reason, status=status_code, kind="server_error")
        )
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.body()))

    def _handle_request_exception(self, e):
        if isinstance(e, APIError):
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    def on_connection_close(self):
        for gen in self._gens:  # the client went away: free its blocks
            if not gen.done.is_set():
                gen.cancel()

    def send_json(self, obj: dict) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    async def send_event(self, obj) -> None:
        self.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n")
        await self.flush()

    def chunk(self, rid: str, created: int, obj: str, choices: list, usage: dict | None = None) -> dict:
        """One streamed event of a response (``usage`` on the last, when asked for)."""
        event = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self.backend.model_name,
            "choices": choices,
        }
        if usage is not None:
            event["usage"] = usage
        return event

    def start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")


class _Deltas:
    """What of each choice's text and token ids a stream has not sent yet."""

    def __init__(self):
        self.sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, tokens) sent

    def take(self, index: int, c, announce: bool = False) -> tuple[str, list[int], bool] | None:
        """The unsent text and token ids of choice ``c`` and whether it is its first event; None
        when there is nothing to send (``announce``: the first event goes out even if empty)."""
        first = index not in self.sent
        text_at, ids_at = self.sent.get(index, (0, 0))
        text, ids = c.text[text_at:], c.token_ids[ids_at:]
        if not (first and announce) and not text and not ids and c.finish_reason is None:
            return None
        self.sent[index] = (len(c.text), len(c.token_ids))
        return text, ids, first


class ModelsHandler(_Handler):
    async def get(self):
        await self.user({})  # authenticates where users are known
        await self.backend.ensure()
        name = self.backend.model_name
        self.send_json(
            {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pagedq"}]}
        )


class MetricsHandler(_Handler):
    """``GET .../metrics``: Prometheus text (KV pool, queues, tokens, tokens served per user)."""

    async def get(self):
        await self.user({})
        await self.backend.ensure()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(await self.backend.metrics())


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(lp) -> str:
    return lp.decoded_token or ""  # the engine decodes every logprob token


class CompletionsHandler(_Handler):
    async def post(self):
        body, user, params = await self.begin(chat=False)
        prompts = body.get("prompt")
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise APIError("prompt must be a string, a list of strings, or token ids", "prompt")
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
        try:
            for p in prompts:
                self._gens.append(await self.backend.submit(p, params, user))
        except APIError:  # one bad prompt: nothing of the request stays queued
            for gen in self._gens:
                gen.cancel()
            raise
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        if body.get("stream"):
            await self._stream(rid, created, n, bool((body.get("stream_options") or {}).get("include_usage")))
            return
        finals = []
        for gen in self._gens:
            last = None
            async for out in _outputs(gen):
                last = out
            finals.append(last)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(
                    {
                        "index": i * n + c.index,
                        "text": c.text,
                        "logprobs": self._logprobs(c) if params.logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        "token_ids": c.token_ids,  # beside OpenAI's fields, as vLLM does
                    }
                )
        prompt_tokens = sum(len(o.prompt_token_ids) for o in finals)
        self.send_json(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.backend.model_name,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )

    def _logprobs(self, c) -> dict:
        tokens, lps, tops, offsets, pos = [], [], [], [], 0
        for token_id, dist in zip(c.token_ids, c.logprobs or []):
            text = _token_text(dist[token_id])
            tokens.append(text)
            lps.append(dist[token_id].logprob)
            tops.append({_token_text(lp): lp.logprob for t, lp in dist.items()})
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _stream(self, rid: str, created: int, n: int, include_usage: bool) -> None:
        self.start_stream()
        deltas = _Deltas()
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            async for out in _outputs(gen):
                await merged.put((i, out))
            await merged.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self._gens)]
        pending, prompt_tokens, completion_tokens = len(tasks), 0, 0
        try:
            while pending:
                i, out = await merged.get()
                if out is None:
                    pending -= 1
                    continue
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids)
                    completion_tokens += sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    index = i * n + c.index
                    new = deltas.take(index, c)
                    if new is None:
                        continue
                    text, ids, _ = new
                    choice = {
                        "index": index, "text": text, "logprobs": None, "finish_reason": c.finish_reason,
                        "token_ids": ids,
                    }  # fmt: skip
                    await self.send_event(self.chunk(rid, created, "text_completion", [choice]))
            if include_usage:
                usage = _usage(prompt_tokens, completion_tokens)
                await self.send_event(self.chunk(rid, created, "text_completion", [], usage))
            await self.send_event("[DONE]")
        except tornado.iostream.StreamClosedError:
            self.on_connection_close()
        finally:
            for t in tasks:
                t.cancel()


class ChatCompletionsHandler(_Handler):
    async def post(self):
        body, user, params = await self.begin(chat=True)
        prompt = self.backend.chat_prompt(body.get("messages"))
        gen = await self.backend.submit(prompt, params, user)
        self._gens.append(gen)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.backend.model_name
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self.start_stream()
            deltas = _Deltas()
            try:
                async for out in _outputs(gen):
                    for c in out.outputs:
                        new = deltas.take(c.index, c, announce=True)
                        if new is None:
                            continue
                        text, ids, first = new
                        d = {"role": "assistant", "content": text} if first else {"content": text}
                        choice = {
                            "index": c.index,
                            "delta": d,
                            "logprobs": None,
                            "finish_reason": c.finish_reason,
                            "token_ids": ids,
                        }
                        await self.send_event(self.chunk(rid, created, "chat.completion.chunk", [choice]))
                    if out.finished and include_usage:
                        usage = _usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))
                        await self.send_event(self.chunk(rid, created, "chat.completion.chunk", [], usage))
                await self.send_event("[DONE]")
            except tornado.iostream.StreamClosedError:
                self.on_connection_close()
            return
        last = None
        async for out in _outputs(gen):
            last = out
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c, params.logprobs) if params.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "token_ids": c.token_ids,
            }
            for c in last.outputs
        ]
        self.send_json(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": choices,
                "usage": _usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs)),
            }
        )

    def _logprobs(self, c, k: int) -> dict:
        content = []
        for token_id, dist in zip(c.token_ids, c.logprobs or []):
            text = _token_text(dist[token_id])
            top = sorted(dist.items(), key=lambda kv: -kv[1].logprob)[:k]
            content.append(
                {
                    "token": text,
                    "logprob": dist[token_id].logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": lp.logprob, "bytes": list(t.encode())}
                        for t, lp in ((_token_text(lp), lp) for t, lp in top)
                    ],
                }
            )
        return {"content": content}


def routes(prefix: str, backend: Backend, api_key: str | None = None, user_of=None) -> list:
    """The API's tornado routes under ``prefix`` (e.g. ``/v1`` or ``<base_url>pagedq/v1``)."""
    kw = {"backend": backend, "api_key": api_key, "user_of": user_of}
    prefix = prefix.rstrip("/")
    return [
        (prefix + "/models", ModelsHandler, kw),
        (prefix + "/completions", CompletionsHandler, kw),
        (prefix + "/chat/completions", ChatCompletionsHandler, kw),
        (prefix + "/metrics", MetricsHandler, kw),
    ]


def make_app(
    llm, model_name: str | None = None, api_key: str | None = None, hub=None
) -> tornado.web.Application:
    """A standalone app serving ``llm`` at ``/v1`` (what ``pagedq serve`` runs); with ``hub`` (a
    :class:`~pagedq.jupyter_ext.hub.HubUsers`), at the hub service's prefix, users from hub tokens."""
    import os

    driver = llm._driver or EngineDriver(llm)
    name = model_name or os.path.basename(os.path.normpath(llm.engine.config.model))
    if hub is not None:
        from .hub import service_prefix

        return tornado.web.Application(routes(service_prefix() + "v1", Backend(driver, name), user_of=hub))
    return tornado.web.Application(routes("/v1", Backend(driver, name), api_key))


def serve(
    llm,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    hub: bool = False,
) -> None:
    """Serve ``llm`` until interrupted (``pagedq serve``); the engine is closed on the way out."""
    import tornado.httpserver
    import tornado.ioloop

    users = None
    if hub:
        from .hub import HubUsers

        users = HubUsers()
    app = make_app(llm, model_name, api_key, hub=users)
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, host)
    rule = app.wildcard_router.rules[0]
    name = rule.target_kwargs["backend"].model_name
    path = rule.matcher.regex.pattern.rsplit("/models", 1)[0]
    print(
        f"pagedq: serving {name!r} at http://{host}:{port}{path} (OpenAI-compatible; Ctrl-C stops)",
        flush=True,
    )
    try:
        tornado.ioloop.IOLoop.current().start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        llm.close()
