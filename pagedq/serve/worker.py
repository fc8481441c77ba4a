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
    send_lock = threading.Lock()
    trackers: dict[str, DeltaTracker] = {}  # the requests in the engine, by id
    requests_lock = threading.Lock()
    cancelled: dict[str, None] = {}  # aborted before their submit was processed

    def send(msg) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):  # the server is gone: the recv loop ends too
                pass

    def forward(outs) -> None:
        deltas = []
        for out in outs:
            tracker = trackers.get(out.request_id)
            if tracker is None:  # aborted meanwhile
                continue
            deltas.append(tracker.delta(out))
            if out.finished:
                trackers.pop(out.request_id, None)
        if deltas:
            send(("outputs", deltas))

    driver = llm.start_driver(listener=forward)
    engine = llm.engine
    tokenizer = llm.get_tokenizer()

    def submit(rid: str, prompt, params, user: str) -> None:
        from pagedq.llm import chat_prompt

        param = "prompt"
        try:
            if isinstance(prompt, Chat):
                param = "messages"
                prompt = chat_prompt(tokenizer, prompt.messages, prompt.add_generation_prompt)
            text, ids = engine.validate_request(prompt, params)  # tokenizes, outside the lock
            with requests_lock:
                if rid in cancelled:  # the caller went away while its prompt was being prepared
                    del cancelled[rid]
                    return
                trackers[rid] = DeltaTracker(params.stop_strings)
                driver.add({"prompt": text, "prompt_token_ids": ids}, params, user=user, request_id=rid)
        except Exception as e:  # bad input (ValueError), or a template that refuses the messages
            trackers.pop(rid, None)
            if not isinstance(e, ValueError):
                logger.warning("request %s refused: %s: %s", rid, type(e).__name__, e)
            send(("rejected", rid, _message(e), param))
            return
        send(("accepted", rid, len(ids)))

    info = EngineInfo(
        os.path.basename(os.path.normpath(engine.config.model)),
        engine.max_model_len,
        engine.model_config.vocab_size,
        os.getpid(),
    )
    send(("ready", info))
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagedq-tokenize")
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the server went away
                break
            kind = msg[0]
            if kind == "close":
                break
            if kind == "submit":
                pool.submit(submit, *msg[1:])
            elif kind == "abort":
                with requests_lock:
                    if trackers.pop(msg[1], None) is not None:
                        driver.abort(msg[1])
                    else:  # not queued yet (or already finished): never queue it
                        cancelled[msg[1]] = None
                        while len(cancelled) > 10_000:
                            cancelled.pop(next(iter(cancelled)))
            elif kind == "stats":
                with driver.lock:
                    payload = (engine.stats(), engine.user_stats(), engine.latency)
                    send(("stats", msg[1], payload))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        llm.close()  # stops the driver too


def _message(e: Exception) -> str:
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
