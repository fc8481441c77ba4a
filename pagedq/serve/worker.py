"""The engine process: it loads the model and runs the engine for the server, over a pipe.

Everything that can be slow or can crash lives here, not in the server: tokenization and chat
templating (in a small thread pool, outside the engine's lock, so a 5 MB prompt delays only
itself), request validation against the model, and the engine loop (an
:class:`~pagedq.driver.EngineDriver` thread). The server (:mod:`pagedq.serve.supervisor`)
restarts this process when it dies.

Messages (tuples) on the pipe::

    server -> engine   ("submit", rid, prompt, params, user)   prompt: str | list[int] | Chat
                       ("abort", rid) | ("stats", rid) | ("close",)
    engine -> server   ("ready", EngineInfo) | ("failed", message)   once, at start
                       ("accepted", rid, num_prompt_tokens) | ("rejected", rid, message, param)
                       ("outputs", [OutputDelta, ...])              once per engine step
                       ("stats", rid, (stats, user_stats, latency))

Outputs travel as deltas (the text and tokens new since the last message), so a long answer
costs the pipe its length once, not once per token. While a stop string could still cut the
end of a sequence's text, that end is held back, so no streamed character is ever taken back.

This module imports no torch at import time: the server imports its message types.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Chat:
    """A chat prompt, templated in the engine process (which holds the tokenizer)."""

    messages: list[dict]
    add_generation_prompt: bool = True


@dataclass
class EngineInfo:
    model_name: str
    max_model_len: int
    vocab_size: int
    pid: int


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None = None  # one dict[int, Logprob] per new token, when asked for
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class OutputDelta:
    """What one request produced in one step."""

    request_id: str
    choices: list[ChoiceDelta] = field(default_factory=list)
    finished: bool = False
    num_prompt_tokens: int = 0
    error: str | None = None


class DeltaTracker:
    """Turns a request's cumulative outputs into deltas, holding back a possible stop string."""

    def __init__(self, stop_strings: list[str]):
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.sent: dict[int, tuple[int, int, int]] = {}  # choice -> (chars, tokens, logprobs) sent

    def delta(self, out) -> OutputDelta:
        d = OutputDelta(out.request_id, [], out.finished, len(out.prompt_token_ids), out.error)
        for c in out.outputs:
            chars, toks, lps = self.sent.get(c.index, (0, 0, 0))
            end = len(c.text) if c.finish_reason is not None else max(chars, len(c.text) - self.hold)
            new_lps = c.logprobs[lps:] if c.logprobs is not None else None
            if end == chars and len(c.token_ids) == toks and c.finish_reason is None:
                continue
            d.choices.append(
                ChoiceDelta(
                    c.index, c.text[chars:end], c.token_ids[toks:], new_lps, c.finish_reason, c.stop_reason
                )
            )
            self.sent[c.index] = (end, len(c.token_ids), lps + len(new_lps or ()))
        return d


def run(conn, model: str, engine_options: dict) -> None:
    """The engine process's main (a ``multiprocessing`` spawn target)."""
    _die_with_parent()
    # Ctrl-C in a terminal and `kill -TERM -<group>` reach every process of the group: the
    # server decides when the engine stops (it drains first), over the pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pagedq.llm import LLM

    try:
        llm = LLM(model, **engine_options)
    except Exception as e:  # a bad model path or option: tell the server why, and stop
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    try:
        _Worker(conn, llm).serve()
    finally:
        llm.close()  # stops the driver too


class _Worker:
    """The engine side of the pipe: requests in (tokenized on a small pool, off the engine's
    lock), per-step output deltas out (from the driver thread's listener)."""

    def __init__(self, conn, llm):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.trackers: dict[str, DeltaTracker] = {}  # the requests in the engine, by id
        self.requests_lock = threading.Lock()
        self.cancelled: dict[str, None] = {}  # aborted before their submit was processed
        self.driver = llm.start_driver(listener=self.forward)
        self.engine = llm.engine
        self.tokenizer = llm.get_tokenizer()

    def send(self, msg) -> None:
        with self.send_lock, contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(msg)  # on failure the server is gone: the recv loop ends too

    def forward(self, outs) -> None:
        deltas = []
        for out in outs:
            tracker = self.trackers.get(out.request_id)
            if tracker is None:  # aborted meanwhile
                continue
            deltas.append(tracker.delta(out))
            if out.finished:
                self.trackers.pop(out.request_id, None)
        if deltas:
            self.send(("outputs", deltas))

    def submit(self, rid: str, prompt, params, user: str) -> None:
        from pagedq.llm import chat_prompt

        param = "prompt"
        try:
            if isinstance(prompt, Chat):
                param = "messages"
                prompt = chat_prompt(self.tokenizer, prompt.messages, prompt.add_generation_prompt)
            text, ids = self.engine.validate_request(prompt, params)  # tokenizes, outside the lock
            with self.requests_lock:
                if rid in self.cancelled:  # the caller went away while its prompt was being prepared
                    del self.cancelled[rid]
                    return
                self.trackers[rid] = DeltaTracker(params.stop_strings)
                prepared = {"prompt": text, "prompt_token_ids": ids}
                # added by the driver's loop before its next step, without waiting for the
                # running one; the answer goes back from there (see _admitted)
                self.driver.enqueue(
                    prepared,
                    params,
                    rid,
                    user=user,
                    done=functools.partial(self._admitted, rid, len(ids), param),
                )
        except Exception as e:  # bad input (ValueError), or a template that refuses the messages
            self._admitted(rid, 0, param, e)

    def _admitted(self, rid: str, num_tokens: int, param: str, error: BaseException | None) -> None:
        """Tell the server whether request ``rid`` is in the engine."""
        if error is None:
            self.send(("accepted", rid, num_tokens))
            return
        self.trackers.pop(rid, None)
        if not isinstance(error, ValueError):
            logger.warning("request %s refused: %s: %s", rid, type(error).__name__, error)
        self.send(("rejected", rid, _message(error), param))

    def abort(self, rid: str) -> None:
        with self.requests_lock:
            if self.trackers.pop(rid, None) is not None:
                self.driver.abort(rid)
            else:  # not queued yet (or already finished): never queue it
                self.cancelled[rid] = None
                while len(self.cancelled) > 10_000:
                    self.cancelled.pop(next(iter(self.cancelled)))

    def stats(self, ask_id) -> None:
        with self.driver.caller_lock():
            payload = (self.engine.stats(), self.engine.user_stats(), self.engine.latency)
            self.send(("stats", ask_id, payload))

    def serve(self) -> None:
        engine = self.engine
        info = EngineInfo(
            os.path.basename(os.path.normpath(engine.config.model)),
            engine.max_model_len,
            engine.model_config.vocab_size,
            os.getpid(),
        )
        self.send(("ready", info))
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagedq-tokenize")
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):  # the server went away
                    break
                kind = msg[0]
                if kind == "close":
                    break
                if kind == "submit":
                    pool.submit(self.submit, *msg[1:])
                elif kind == "abort":
                    self.abort(msg[1])
                elif kind == "stats":
                    self.stats(msg[1])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _message(e: BaseException) -> str:
    return (
        str(e) if isinstance(e, ValueError) else f"the prompt could not be prepared: {type(e).__name__}: {e}"
    )


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the server dies (the pipe's EOF is the portable way;
    this also covers a server killed while this process is busy in a step)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
