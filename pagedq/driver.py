"""A background thread that steps one engine, so that notebook cells, widgets and background
generations all submit to the same continuous batch.

The notebook kernel owns the engine; this driver owns its loop. ``submit`` queues a request
and returns a :class:`Generation` at once; the thread runs ``engine.step()`` while anything is
unfinished and hands each output to its generation (a queue, plus optional callbacks run on
the driver thread). Engine calls are serialized by one lock, so ``abort`` from the notebook's
thread (a Stop button, a kernel interrupt) is safe at any time. No process is spawned.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from .outputs import GenerationError, RequestOutput

logger = logging.getLogger(__name__)

# The longest the loop holds its next step back for callers waiting for the engine lock.
_CALLER_WAIT = 0.05
_CLOSED = "the engine driver is closed; load a model again"


class Aborts(Protocol):
    """What a :class:`Generation` needs of what runs it: the engine driver, or the shared
    engine's client."""

    def abort(self, request_id: str) -> object: ...


class Generation:
    """One submitted request: its outputs as they arrive, and a way to stop it."""

    def __init__(self, driver: Aborts, request_id: str):
        self.driver = driver
        self.request_id = request_id
        self.latest: RequestOutput | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.finished_at: float | None = None
        self._queue: queue.Queue[RequestOutput | None] = queue.Queue()
        self._callbacks: list[Callable[[RequestOutput], None]] = []

    def on_output(self, fn: Callable[[RequestOutput], None]) -> None:
        """Call ``fn(output)`` on the driver thread for every new output (and at once for the latest)."""
        self._callbacks.append(fn)
        if self.latest is not None:
            fn(self.latest)

    def outputs(self, poll: float = 0.1) -> Iterator[RequestOutput]:
        """Outputs as they come (blocking); the last one is finished. Interruptible (Ctrl-C)."""
        while True:
            try:
                out = self._queue.get(timeout=poll)
            except queue.Empty:
                if self.done.is_set() and self._queue.empty():
                    break
                continue
            if out is None:
                break
            yield out
        self._raise_error()

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The final output (waits for it; Ctrl-C interrupts the wait)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.done.wait(0.1):
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"generation {self.request_id} is still running")
        self._raise_error()
        if self.latest is None:  # done without an output or an error: aborted before its first step
            raise GenerationError(f"generation {self.request_id} ended before producing output")
        return self.latest

    def _raise_error(self) -> None:
        """Raise what ended this generation, if it did not finish: a :class:`GenerationError`
        (or the client's subclass of it), never cut-off text as a result."""
        if self.error is None:
            return
        if isinstance(self.error, GenerationError):
            raise self.error
        raise GenerationError(f"generation {self.request_id} failed: {self.error}") from self.error

    def cancel(self) -> None:
        """Abort the request: its blocks are freed at once; the last output is marked ``abort``."""
        self.driver.abort(self.request_id)

    @property
    def tokens_per_second(self) -> float:
        if self.latest is None:
            return 0.0
        n = sum(len(c.token_ids) for c in self.latest.outputs)
        end = self.finished_at or time.perf_counter()
        return n / max(end - self.started, 1e-9)

    def _deliver(self, out: RequestOutput) -> None:
        self.latest = out
        self._queue.put(out)
        for fn in self._callbacks:
            with contextlib.suppress(Exception):  # a display callback must not stop the engine
                fn(out)
        if out.finished:
            self._finish(
                GenerationError(f"generation {self.request_id} failed: {out.error}", [out])
                if out.error
                else None
            )

    def _finish(self, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.error = error
        self.finished_at = time.perf_counter()
        self.done.set()
        self._queue.put(None)

    def __repr__(self) -> str:
        state = "done" if self.done.is_set() else "running"
        return f"<Generation {self.request_id} {state}>"


class EngineDriver:
    """Steps ``engine`` on a daemon thread while requests are unfinished.

    Made by :meth:`pagedq.LLM.start_driver`, which then routes ``generate`` / ``stream`` /
    ``next_token_logprobs`` here (the same calls as ``llm.InlineLoop``). ``listener(outputs)``,
    if given, is called on the driver thread (outside the lock) with the outputs of every step —
    how the serving worker forwards them, without a :class:`Generation` per request (see
    :meth:`add`).
    """

    def __init__(self, engine, listener: Callable[[list[RequestOutput]], None] | None = None):
        self.engine = engine
        self.listener = listener
        self.lock = threading.RLock()
        # callers other than the loop waiting for the lock (see caller_lock), and their condition
        self._callers = 0
        self._callers_done = threading.Condition(threading.Lock())
        # requests handed in without the engine lock (see enqueue), and the loop's wake-up: it
        # sleeps on this condition (not the engine lock) while idle, until a request or close
        self._intake: list[tuple] = []
        self._work = threading.Condition(threading.Lock())
        self._poked = False
        self._gens: dict[str, Generation] = {}
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="pagedq-engine", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def caller_lock(self):
        """The engine lock for a caller other than the loop (a submit, an abort), ahead of the
        loop's next step. A plain lock went back to the loop step after step: it releases the
        lock and takes it again within microseconds, while a waiting thread must first be woken
        and get the GIL. Served at 8 requests/s on `bench` (steps of 100-300 ms), a request's
        ``add`` waited for the lock 95 ms at the median, 344 at p90 and 548 at most, several
        steps, and the two threads that hand requests in queued the rest behind them (TTFT p50
        1.2-1.7 s where vLLM's was 0.3). Now the loop waits, before each step, until every caller
        that was waiting has had the lock (at most ``_CALLER_WAIT`` seconds)."""
        with self._callers_done:
            self._callers += 1
        try:
            with self.lock:
                yield
        finally:
            with self._callers_done:
                self._callers -= 1
                if not self._callers:
                    self._callers_done.notify_all()

    def _let_callers_in(self) -> None:
        with self._callers_done:
            if self._callers:
                self._callers_done.wait_for(lambda: not self._callers, timeout=_CALLER_WAIT)

    def submit(self, prompt, params=None, prepare=None, user: str | None = None) -> Generation:
        """Validate and queue one request (``ValueError`` on bad input, nothing queued).

        ``prepare(request)`` runs under the engine lock before the request is first stepped;
        ``user`` names who asked (fair sharing).
        """
        with self.caller_lock():
            if self._closed:
                raise RuntimeError(_CLOSED)
            rid = self.engine.add_request(prompt, params, user=user)
            if prepare is not None:
                prepare(self.engine.requests[rid])
            gen = Generation(self, rid)
            self._gens[rid] = gen
        self._poke()
        return gen

    def add(self, prompt, params=None, user: str | None = None, request_id: str | None = None) -> str:
        """Validate and queue one request whose outputs go to the listener only; returns its id."""
        with self.caller_lock():
            if self._closed:
                raise RuntimeError(_CLOSED)
            rid = self.engine.add_request(prompt, params, request_id=request_id, user=user)
        self._poke()
        return rid

    def enqueue(
        self,
        prompt,
        params,
        request_id: str,
        user: str | None = None,
        done: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Hand a request to the loop without waiting for the engine lock: the loop adds it
        before its next step and then calls ``done(None)``, or ``done(error)`` where
        ``engine.add_request`` refused it (on the driver thread, before the outputs of that step
        go to the listener); its outputs go to the listener only, as :meth:`add`'s.

        Why: a caller of :meth:`add` holds its thread until the running step ends. The serving
        worker hands requests in from two threads; at 8 requests/s on `bench` (steps of 300-700
        ms) a third request arriving during a step waited for the next one as well, and the one
        after it for a third: ``add`` took 8 ms at the median and 507 ms at p90 (1.05 s at
        most), and TTFT p50 grew to 1.9 s where vLLM's was 0.3-1.1."""
        with self._work:
            if self._closed:
                raise RuntimeError(_CLOSED)
            self._intake.append((prompt, params, request_id, user, done))
            self._work.notify_all()

    def _poke(self) -> None:
        """Wake the loop if it sleeps (a request was added to the engine)."""
        with self._work:
            self._poked = True
            self._work.notify_all()

    def reset_prefix_cache(self) -> bool:
        """The engine's, under the engine lock (between steps)."""
        with self.caller_lock():
            return self.engine.reset_prefix_cache()

    def abort(self, request_id: str) -> RequestOutput | None:
        with self._work:  # not added yet: it never will be (and hears nothing)
            before = len(self._intake)
            self._intake = [item for item in self._intake if item[2] != request_id]
            if len(self._intake) != before:
                return None
        with self.caller_lock():
            out = self.engine.abort(request_id)
            gen = self._gens.pop(request_id, None)
        if gen is not None:
            if out is not None:
                gen._deliver(out)
            gen._finish()
        return out

    def generate(
        self, prompts: list, params: list, user: str | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        """``LLM.generate`` through the driver (prompts already validated): results in order."""
        gens = []
        try:
            for p, sp in zip(prompts, params):
                gens.append(self.submit(p, sp, user=user))
            return [g.result() for g in gens]
        except BaseException:
            for g in gens:
                g.cancel()
            raise

    def stream(self, prompts: list, params: list) -> Iterator[RequestOutput]:
        """``LLM.stream`` through the driver: outputs of all prompts as they come."""
        merged: queue.Queue[RequestOutput] = queue.Queue()
        gens = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        for g in gens:
            g.on_output(merged.put)
        pending = {g.request_id for g in gens}
        try:
            while pending:
                try:
                    out = merged.get(timeout=0.1)
                except queue.Empty:
                    continue
                if out.raise_if_failed().finished:
                    pending.discard(out.request_id)
                yield out
        finally:
            for g in gens:
                if g.request_id in pending:
                    g.cancel()

    def distributions(self, prompts: list, params) -> list:
        """``LLM.next_token_logprobs`` through the driver."""
        import torch

        reqs = []

        def keep(req):
            req.prompt_distributions = []
            reqs.append(req)

        gens = [self.submit(p, params, prepare=keep) for p in prompts]
        for g in gens:
            g.result()
        return [torch.cat(r.prompt_distributions) for r in reqs]

    @property
    def generations(self) -> list[Generation]:
        with self.caller_lock():
            return list(self._gens.values())

    def _loop(self) -> None:
        busy = True  # the engine had unfinished requests after the last step (first: look)
        while True:
            self._let_callers_in()
            with self._work:
                while not (busy or self._intake or self._poked or self._closed):
                    self._work.wait()
                self._poked = False
            self._admit()
            outs: list[RequestOutput] = []
            delivered: list = []
            with self.lock:
                if not self._closed and self.engine.has_unfinished_requests():
                    try:
                        outs = self.engine.step()
                        self.steps += 1
                    except Exception as e:  # the engine could not isolate it: fail everyone, keep going
                        logger.exception("an engine step failed; failing every request in the engine")
                        outs = self.engine.fail_all(f"the engine step failed: {type(e).__name__}: {e}")
                    delivered = [(self._gens.get(o.request_id), o) for o in outs]
                    for o in outs:
                        if o.finished:
                            self._gens.pop(o.request_id, None)
                busy = not self._closed and self.engine.has_unfinished_requests()
                closed = self._closed
            if self.listener is not None and outs:
                try:
                    self.listener(outs)
                except Exception:  # a listener must not stop the engine
                    logger.exception("the engine driver's listener failed")
            for gen, out in delivered:  # callbacks run outside the lock: they may submit or abort
                if gen is not None:
                    gen._deliver(out)
            if closed:
                self._admit()  # what was handed in before close: refused, its callers told
                return

    def _admit(self) -> None:
        """Add the requests handed to :meth:`enqueue` (under the engine lock, so that an abort
        finds each either still queued or in the engine), then tell their callers."""
        with self._work:
            if not self._intake:
                return
        admitted = []
        with self.lock:
            with self._work:
                intake, self._intake = self._intake, []
            for prompt, params, rid, user, done in intake:
                error: BaseException | None = None
                if self._closed:
                    error = RuntimeError(_CLOSED)
                else:
                    try:
                        self.engine.add_request(prompt, params, request_id=rid, user=user)
                    except Exception as e:  # refused (validated before, so rare): its caller hears
                        error = e
                admitted.append((done, error))
        for done, error in admitted:  # before any output of theirs reaches the listener
            if done is not None:
                try:
                    done(error)
                except Exception:
                    logger.exception("a request's intake callback failed")

    def close(self) -> None:
        """Abort everything, stop the thread (the engine itself is closed by its owner)."""
        with self.caller_lock():
            for rid in list(self._gens):
                self.engine.abort(rid)
                self._gens.pop(rid)._finish()
            with self._work:  # the loop wakes to see it
                self._closed = True
                self._work.notify_all()
        self._thread.join(timeout=10)
