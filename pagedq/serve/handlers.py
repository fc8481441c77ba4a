"""The request handlers' common machinery: JSON in and out, OpenAI-shaped errors, the caller,
admission, and a request's outputs from the engine process to the event loop.

A generation request is: who calls (identity) → parse and check the body (strict schema, then
the server's limits) → count its prompts in flight (429 over a limit) → submit each prompt to
the engine process (which tokenizes and validates it: 400 if it refuses) → read the outputs as
they come. A client that hangs up aborts its prompts at once; when a request ends, its prompts
stop counting against the limits. The event loop never tokenizes or waits on the engine: it
only awaits messages the supervisor's thread hands over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import tornado.iostream
import tornado.web
from pydantic import BaseModel, ValidationError

from .admission import Admission
from .config import ServeConfig
from .errors import APIError, from_validation_error
from .identity import Identity
from .protocol import GenerationRequest
from .supervisor import EngineSupervisor
from .worker import ChoiceDelta, OutputDelta

logger = logging.getLogger("pagedq.serve")

# bodies larger than this are parsed on a thread, off the event loop
_PARSE_INLINE_BYTES = 256 * 1024


@dataclass
class ServingState:
    """What every handler of one server shares."""

    supervisor: EngineSupervisor
    config: ServeConfig
    identity: Identity
    admission: Admission
    draining: bool = False
    rejected: dict[int, int] = field(default_factory=dict)  # HTTP status -> requests refused
    # requests per label (the body's user where it is not the user), most recent last; the least
    # recently seen label is dropped beyond max_labels, so no caller can grow the metrics unbounded
    labels: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def count_label(self, label: str) -> None:
        self.labels[label] = self.labels.pop(label, 0) + 1
        while len(self.labels) > self.config.max_labels:
            self.labels.popitem(last=False)

    async def first_start(self) -> None:
        """Start the engine if nobody has (the extension starts it on first use) and wait for its
        first start; a restart after a failure is not waited for (503 + Retry-After then)."""
        sup = self.supervisor
        sup.start()
        deadline = time.monotonic() + self.config.engine_start_timeout
        while sup.state == "starting" and time.monotonic() < deadline and not self.draining:
            await asyncio.sleep(0.05)

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        info = self.supervisor.info
        if info is not None:
            return info.model_name
        import os

        return os.path.basename(os.path.normpath(self.supervisor.model))


class BaseHandler(tornado.web.RequestHandler):
    """JSON handlers with errors in OpenAI's shape (``{"error": {...}}``)."""

    def initialize(self, state: ServingState):
        self.state = state
        self.principal: str | None = None
        self.user: str | None = None

    async def authenticate(self) -> str | None:
        """Who sends the request, as the server's identity decides (401/403 otherwise)."""
        self.principal = await self.state.identity.authenticate(self)
        return self.principal

    def serve_as(self, body_user: str | None) -> str:
        """The user this request is served as (fair share, limits): the authenticated user, or
        the body's ``user`` only where the operator trusts it."""
        self.user = self.state.identity.user_for(self.principal, body_user)
        if body_user and body_user != self.user:
            self.state.count_label(body_user)
        return self.user

    def send_json(self, obj: BaseModel | dict, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        body = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
        self.finish(body)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, APIError):
            err = exc
        elif isinstance(exc, tornado.web.HTTPError):
            err = APIError(exc.log_message or self._reason, status_code)
        else:
            err = APIError("internal server error (the server's log has the details)", status_code)
        self.state.rejected[err.status] = self.state.rejected.get(err.status, 0) + 1
        self.set_header("Content-Type", "application/json")
        for name, value in err.headers().items():
            self.set_header(name, value)
        self.finish(json.dumps(err.body()))

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, APIError):
            if self._finished:
                return
            if self._headers_written:  # a stream already started: end it with an error event
                return
            self.clear()
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))
            return
        super()._handle_request_exception(e)

    async def parse(self, model: type[BaseModel]) -> BaseModel:
        body = self.request.body or b""
        limit = self.state.config.max_body_bytes
        if len(body) > limit:
            raise APIError(
                f"the request body has {len(body)} bytes; this server takes at most {limit} (max_body_bytes)",
                400,
            )
        try:
            if len(body) > _PARSE_INLINE_BYTES:
                return await asyncio.get_running_loop().run_in_executor(None, model.model_validate_json, body)
            return model.model_validate_json(body)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def check_model(self, name: str | None) -> None:
        served = self.state.model_name
        if name is not None and name != served:
            raise APIError(
                f"the model {name!r} does not exist: this server serves {served!r} (GET /v1/models)",
                404,
                "model",
                code="model_not_found",
            )


class _Sink:
    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def _put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def push(self, delta: OutputDelta) -> None:
        self._put((self.index, delta, None))

    def fail(self, error: APIError) -> None:
        self._put((self.index, None, error))


@dataclass
class Choice:
    """What one sequence of one prompt produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


class GenerationHandler(BaseHandler):
    """A handler that runs prompts on the engine and reads their outputs."""

    def initialize(self, state: ServingState):
        super().initialize(state)
        self._rids: dict[int, str] = {}  # prompt index -> engine request id, while in flight
        self._held = 0  # prompts counted against the admission limits
        self._started: set[int] = set()  # prompts that produced a token (no longer queued)
        self._queue: asyncio.Queue | None = None
        self._gone = False
        self.request_id = ""
        self.created = int(time.time())

    async def begin(self, model: type[GenerationRequest]) -> Any:
        """A generation request's start: who calls, its body, the user it is served as, its model."""
        await self.authenticate()
        req = cast(GenerationRequest, await self.parse(model))
        self.serve_as(req.user)
        self.check_model(req.model)
        return req

    @property
    def caller(self) -> str:
        """Who the request is served as (set by :meth:`begin`)."""
        if self.user is None:
            raise RuntimeError("the request has no user yet: begin() sets it")
        return self.user

    async def collect(self) -> dict[tuple[int, int], Choice] | None:
        """Every choice of every prompt, whole (None if the client went away meanwhile)."""
        choices: dict[tuple[int, int], Choice] = {}
        try:
            async for index, delta in self.outputs(keepalive=False):
                merge(choices, index, delta)
        except tornado.iostream.StreamClosedError:
            return None
        return choices

    async def submit_all(self, prompts: list, params, user: str) -> list[int]:
        """Queue every prompt (all or none); returns the prompts' token counts."""
        if self.state.draining:
            raise APIError("the server is shutting down and takes no new requests", 503, retry_after=5)
        await self.state.first_start()
        self.state.admission.acquire(user, len(prompts))
        self._held = len(prompts)
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        counts = []
        try:
            for i, prompt in enumerate(prompts):
                rid, count = await self.state.supervisor.submit(
                    prompt, params, user, _Sink(loop, self._queue, i)
                )
                self._rids[i] = rid
                counts.append(count)
                if self._gone:
                    raise asyncio.CancelledError
        except BaseException:
            self._abort_all()
            raise
        return counts

    def _done(self, index: int) -> None:
        if self._rids.pop(index, None) is not None and self._held:
            self._held -= 1
            self.state.admission.release(self.caller, 1, 0 if index in self._started else 1)

    def _abort_all(self) -> None:
        for index, rid in list(self._rids.items()):
            self.state.supervisor.abort(rid)
            self._done(index)
        if self._held:  # prompts counted that never reached the engine
            self.state.admission.release(self.caller, self._held, self._held)
            self._held = 0

    def on_connection_close(self) -> None:
        """The client went away: abort its prompts (their blocks are freed at once)."""
        self._gone = True
        self._abort_all()
        if self._queue is not None:
            self._queue.put_nowait(None)

    def on_finish(self) -> None:
        self._abort_all()

    async def outputs(self, keepalive: bool) -> AsyncIterator[tuple[int, OutputDelta]]:
        """The prompts' deltas as they come, until every prompt finished. Raises the
        :class:`APIError` of an engine that died or failed a prompt (the other prompts of the
        request are aborted). With ``keepalive``, a comment line goes out whenever nothing came
        for ``keepalive_seconds``, so clients and proxies see the server alive."""
        interval = self.state.config.keepalive_seconds if keepalive else None
        pending = set(self._rids)
        queue = self._queue
        if queue is None:
            raise RuntimeError("outputs() before submit_all()")
        while pending:
            try:
                item = await asyncio.wait_for(queue.get(), interval)
            except asyncio.TimeoutError:
                await self.send_raw(": keep-alive\n\n")
                continue
            if item is None or self._gone:
                raise tornado.iostream.StreamClosedError()
            index, delta, error = item
            if index not in pending:
                continue
            if error is not None:
                pending.discard(index)
                self._done(index)
                raise error
            if delta.error is not None:
                pending.discard(index)
                self._done(index)
                raise APIError(f"the engine failed this request: {delta.error}", 500)
            if index not in self._started and any(c.token_ids for c in delta.choices):
                self._started.add(index)
                self.state.admission.started(self.caller)
            if delta.finished:
                pending.discard(index)
                self._done(index)
            yield index, delta

    # --- server-sent events ----------------------------------------------------------------

    def start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx and friends: do not buffer the stream

    async def send_raw(self, text: str) -> None:
        self.write(text)
        await self.flush()

    async def send_event(self, obj: BaseModel | dict | str) -> None:
        if isinstance(obj, BaseModel):
            data = obj.model_dump_json()
        elif isinstance(obj, dict):
            data = json.dumps(obj)
        else:
            data = obj
        await self.send_raw(f"data: {data}\n\n")

    async def stream(self, chunks: AsyncIterator) -> None:
        """Send each chunk as an event, then ``[DONE]``; an error ends the stream with an
        ``error`` event instead (OpenAI's clients raise it), never a silent cut."""
        self.start_stream()
        await self.flush()
        try:
            async for chunk in chunks:
                await self.send_event(chunk)
            await self.send_event("[DONE]")
        except tornado.iostream.StreamClosedError:
            self.on_connection_close()
            return
        except APIError as e:
            self.state.rejected[e.status] = self.state.rejected.get(e.status, 0) + 1
            self._abort_all()
            try:
                await self.send_raw(f"event: error\ndata: {json.dumps(e.body())}\n\n")
            except tornado.iostream.StreamClosedError:
                return
        self.finish()

    def new_id(self, prefix: str) -> str:
        self.request_id = f"{prefix}-{uuid.uuid4().hex}"
        return self.request_id


def merge(
    choices: dict[tuple[int, int], Choice], index: int, delta: OutputDelta
) -> list[tuple[int, ChoiceDelta]]:
    """Fold ``delta`` (prompt ``index``) into ``choices``; returns its choice deltas."""
    out = []
    for c in delta.choices:
        acc = choices.setdefault((index, c.index), Choice())
        acc.text += c.text
        acc.token_ids += c.token_ids
        if c.logprobs:
            acc.logprobs += c.logprobs
        if c.finish_reason is not None:
            acc.finish_reason = c.finish_reason
        out.append((c.index, c))
    return out
