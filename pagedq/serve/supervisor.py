"""The server's side of the engine process: start it, talk to it, restart it when it dies.

One supervisor thread owns the engine process (:mod:`pagedq.serve.worker`) for the server's
life: it spawns it, waits until the model is loaded, reads every message it sends, and when the
process dies (a crash, an out-of-memory kill, ``kill -9``) it fails every request in flight with
an explicit 503, logs why the process died, and starts a new one after a backoff that doubles
while restarts keep failing (``restart_backoff_seconds`` .. ``restart_backoff_max_seconds``).
Meanwhile :meth:`EngineSupervisor.submit` answers 503 with a ``Retry-After`` estimate.

Messages to the process go through a sender thread, so the server's event loop never blocks on
the pipe. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .config import ServeConfig
from .errors import APIError, bad_request, unavailable
from .worker import EngineInfo, OutputDelta

logger = logging.getLogger("pagedq.serve")

# an engine that ran this long before dying starts again at the first backoff step
_STABLE_SECONDS = 30.0
_ACK_TIMEOUT = 120.0


class Sink(Protocol):
    """Where one request's outputs go; called from the supervisor's thread."""

    def push(self, delta: OutputDelta) -> None: ...

    def fail(self, error: APIError) -> None: ...


class EngineSupervisor:
    """Runs the engine process for ``model`` (``LLM(model, **engine_options)``) and routes
    requests to it. States: ``starting``, ``ready``, ``restarting``, ``stopping``, ``stopped``."""

    def __init__(
        self,
        model: str,
        engine_options: dict | None = None,
        config: ServeConfig | None = None,
        on_state: Callable[[str], None] | None = None,
    ):
        self.model = model
        self.engine_options = dict(engine_options or {})
        self.config = config or ServeConfig()
        self.on_state = on_state
        self.state = "starting"
        self.info: EngineInfo | None = None
        self.last_error: str | None = None
        self.restarts = 0
        self.process: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None  # the pipe to the engine process while it runs
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sinks: dict[str, Sink] = {}
        self._waiting: dict[str, concurrent.futures.Future] = {}  # submit / stats answers by id
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._next_start = time.monotonic()
        self._startup_seconds = 5.0
        self._thread: threading.Thread | None = None
        self._sender: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervisor thread (the engine loads in the background)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pagedq-supervisor", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="pagedq-engine-sender", daemon=True)
        self._thread.start()
        self._sender.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def retry_after(self) -> float:
        """Seconds until the engine should be serving again (for ``Retry-After``)."""
        if self.state == "ready":
            return 1.0
        return max(0.0, self._next_start - time.monotonic()) + self._startup_seconds

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine process (it finishes nothing more) and the supervisor's threads."""
        if self.state == "stopped":
            return
        self._set_state("stopping")
        self._stop.set()
        self._outbox.put(("close",))
        proc = self.process
        if proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning("the engine process did not stop in %.0f s; killing it", timeout)
                proc.kill()
                proc.join(5)
        self._outbox.put(None)
        for t in (self._thread, self._sender):
            if t is not None and t is not threading.current_thread():
                t.join(10)
        self._fail_all(
            APIError("the server is shutting down; this request was not finished", 503, retry_after=5)
        )
        self._set_state("stopped")

    def _set_state(self, state: str) -> None:
        self.state = state
        if state == "ready":
            self._ready.set()
        else:
            self._ready.clear()
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                logger.exception("a state listener failed")

    # --- requests --------------------------------------------------------------------------

    def _unavailable(self) -> APIError:
        if self.state in ("stopping", "stopped"):
            return unavailable("the server is shutting down", 5)
        what = "is starting" if self.state == "starting" else "is restarting after a failure"
        detail = f" (last error: {self.last_error})" if self.last_error else ""
        return unavailable(f"the engine {what}{detail}; retry later", self.retry_after())

    async def submit(self, prompt, params, user: str, sink: Sink) -> tuple[str, int]:
        """Queue one prompt in the engine; returns (request id, prompt tokens) once the engine has
        validated and tokenized it. Raises :class:`APIError`: 400 for a prompt the engine refuses,
        503 while the engine is not serving."""
        rid = f"r{next(self._ids)}"
        answer: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.state != "ready":
                raise self._unavailable()
            self._sinks[rid] = sink
            self._waiting[rid] = answer
        self._outbox.put(("submit", rid, prompt, params, user))
        try:
            kind, value = await asyncio.wait_for(asyncio.wrap_future(answer), _ACK_TIMEOUT)
        except asyncio.TimeoutError:
            self.abort(rid)
            raise unavailable(f"the engine did not take the request within {_ACK_TIMEOUT:.0f} s", 5) from None
        except BaseException:  # cancelled (the client left) or the engine died: nothing stays queued
            self.abort(rid)
            raise
        if kind == "rejected":
            with self._lock:
                self._sinks.pop(rid, None)
            message, param = value
            raise bad_request(message, param)
        return rid, value

    def abort(self, rid: str) -> None:
        """Stop a request and free its blocks; its sink hears nothing more."""
        with self._lock:
            self._sinks.pop(rid, None)
            answer = self._waiting.pop(rid, None)
        if answer is not None:
            answer.cancel()
        if self.state == "ready":
            self._outbox.put(("abort", rid))

    async def stats(self, timeout: float = 30.0) -> tuple[dict, dict, dict]:
        """The engine's ``stats()``, tokens served per user and latency histograms."""
        if self.state != "ready":
            raise self._unavailable()
        rid = f"s{next(self._ids)}"
        answer: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting[rid] = answer
        self._outbox.put(("stats", rid))
        try:
            _, value = await asyncio.wait_for(asyncio.wrap_future(answer), timeout)
        except asyncio.TimeoutError:
            with self._lock:
                self._waiting.pop(rid, None)
            raise unavailable("the engine did not answer a stats call in time", 5) from None
        return value

    def num_inflight(self) -> int:
        with self._lock:
            return len(self._sinks)

    # --- the supervisor thread -------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            why = self._serve_one_process()
            if self._stop.is_set():
                break
            uptime = time.monotonic() - started
            failures = 1 if uptime >= _STABLE_SECONDS else failures + 1
            delay = min(
                self.config.restart_backoff_max_seconds,
                self.config.restart_backoff_seconds * 2 ** (failures - 1),
            )
            self.last_error = why
            self.restarts += 1
            self._next_start = time.monotonic() + delay
            self._set_state("restarting")
            logger.warning("the engine process %s; restarting it in %.1f s", why, delay)
            self._stop.wait(delay)

    def _serve_one_process(self) -> str:
        """Start an engine process, serve until it dies; return why it died."""
        ctx = multiprocessing.get_context("spawn")
        conn, child = ctx.Pipe()
        from .worker import run

        proc = ctx.Process(
            target=run, args=(child, self.model, self.engine_options), name="pagedq-engine", daemon=True
        )
        t0 = time.monotonic()
        proc.start()
        child.close()
        self.process, self._conn = proc, conn
        why = "did not start"
        try:
            msg = self._first_message(conn, proc)
            if msg is None:
                why = self._death(proc, "did not start")
                return why
            if msg[0] == "failed":
                why = f"could not load {self.model!r}: {msg[1]}"
                return why
            self.info = msg[1]
            self._startup_seconds = time.monotonic() - t0
            self.last_error = None
            self._set_state("ready")
            logger.info(
                "engine for %r ready (pid %d) in %.1f s",
                self.model,
                self.info.pid,
                self._startup_seconds,
            )
            self._read(conn)
            why = self._death(proc, "exited")
            return why
        finally:
            with self._lock:  # no request is taken from here on, so none can be missed below
                self._conn = None
                if self.state == "ready":
                    self.state = "restarting"
                    self._ready.clear()
            self._fail_all(self._died_error(why))
            conn.close()
            if proc.is_alive():
                proc.kill()
            proc.join(5)

    def _first_message(self, conn, proc):
        deadline = time.monotonic() + self.config.engine_start_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            if conn.poll(0.2):
                try:
                    return conn.recv()
                except (EOFError, OSError):
                    return None
            if not proc.is_alive():
                return None
        if proc.is_alive():
            proc.kill()
        return None

    def _read(self, conn) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "outputs":
                for delta in msg[1]:
                    with self._lock:
                        sink = self._sinks.get(delta.request_id)
                        if sink is not None and delta.finished:
                            del self._sinks[delta.request_id]
                    if sink is not None:
                        sink.push(delta)
            elif kind in ("accepted", "rejected", "stats"):
                with self._lock:
                    answer = self._waiting.pop(msg[1], None)
                if answer is not None and not answer.done():
                    answer.set_result((kind, msg[2] if kind != "rejected" else (msg[2], msg[3])))

    @staticmethod
    def _death(proc, default: str) -> str:
        proc.join(1)
        code = proc.exitcode
        if code is None:
            return f"{default} (still running)"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}"
        return f"exited with code {code}" if code else "exited"

    def _died_error(self, why: str) -> APIError:
        if self._stop.is_set():
            return APIError("the server is shutting down; this request was not finished", 503, retry_after=5)
        return unavailable(
            f"the engine process {why} before this request finished; it is being restarted — retry",
            self.config.restart_backoff_seconds + self._startup_seconds,
        )

    def _fail_all(self, error: APIError) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
            waiting, self._waiting = self._waiting, {}
        for answer in waiting.values():
            if not answer.done():
                answer.set_exception(error)
        for sink in sinks.values():
            sink.fail(error)

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            with self._lock:
                conn = self._conn
            if conn is None:
                continue  # no engine now: its requests were failed when it went away
            # on failure the reader sees the engine die and fails what was in flight
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                conn.send(msg)
