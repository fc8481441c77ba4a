"""The shared engine in a worker process, and the driver that talks to it from the server.

A jupyter-server must stay responsive while the engine computes, and a crash or an
out-of-memory in the engine must not take the server (and everyone's notebooks) down with it.
So the extension owns a child process (``multiprocessing``, spawn) that loads the model and runs
an :class:`EngineDriver`; the server keeps a :class:`RemoteDriver` with the driver's interface
(``submit`` returns a :class:`Generation`, ``abort``) over a pipe:

    server -> worker   ("submit", rid, prompt, params, user) | ("abort", rid) | ("stats", rid)
                       | ("close",)
    worker -> server   ("ready", model_name) | ("accepted", rid) | ("error", rid, message)
                       | ("output", rid, RequestOutput) | ("stats", rid, (stats, user_service, latency))

A prompt ``{"messages": [...]}`` is run through the model's chat template in the worker, which
holds the tokenizer.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading

from pagedq.driver import Generation


def _worker_main(conn, model: str, engine_kwargs: dict) -> None:
    from pagedq import LLM
    from pagedq.driver import EngineDriver
    from pagedq.llm import chat_prompt

    try:
        llm = LLM(model, **engine_kwargs)
    except Exception as e:  # a bad model path or option: tell the server why
        conn.send(("dead", f"{type(e).__name__}: {e}"))
        return
    driver = EngineDriver(llm)
    send_lock = threading.Lock()

    def send(msg) -> None:
        with send_lock:
            try:
                conn.send(msg)
            except (BrokenPipeError, OSError):
                pass

    name = os.path.basename(os.path.normpath(llm.engine.config.model))
    send(("ready", name))
    gens: dict[str, Generation] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            if msg[0] == "abort":
                gen = gens.pop(msg[1], None)
                if gen is not None:
                    gen.cancel()
                continue
            if msg[0] == "stats":
                with driver.lock:
                    send(
                        ("stats", msg[1], (llm.engine.stats(), llm.engine.user_service(), llm.engine.latency))
                    )
                continue
            _, rid, prompt, params, user = msg
            try:
                if isinstance(prompt, dict) and "messages" in prompt:
                    prompt = chat_prompt(llm.get_tokenizer(), prompt["messages"])
                gen = driver.submit(prompt, params, user=user)
            except ValueError as e:
                send(("error", rid, str(e)))
                continue
            gens[rid] = gen
            send(("accepted", rid))

            def forward(out, rid=rid):
                send(("output", rid, out))
                if out.finished:
                    gens.pop(rid, None)

            gen.on_output(forward)
    finally:
        driver.close()
        llm.close()


class RemoteDriver:
    """The server's side of the worker: :class:`EngineDriver`'s ``submit``/``abort`` over a pipe."""

    def __init__(self, model: str, engine_kwargs: dict | None = None, start_timeout: float = 600):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main,
            args=(child, model, dict(engine_kwargs or {})),
            name="pagedq-engine",
            daemon=True,
        )
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self.process.kill()
            raise RuntimeError(f"the pagedq engine did not start within {start_timeout:.0f} s")
        msg = self._conn.recv()
        if msg[0] == "dead":
            self.process.join(5)
            raise RuntimeError(f"the pagedq engine could not load {model!r}: {msg[1]}")
        self.model_name = msg[1]
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._gens: dict[str, Generation] = {}
        self._acks: dict[str, tuple[threading.Event, list]] = {}  # request id -> (answered, [answer])
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="pagedq-engine-reader", daemon=True)
        self._reader.start()

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def submit(self, prompt, params=None, user: str | None = None) -> Generation:
        """Queue one request in the worker; ``ValueError`` (the engine's message) on bad input."""
        if self._closed or not self.process.is_alive():
            raise RuntimeError("the pagedq engine process is not running")
        rid = f"r{next(self._ids)}"
        gen = Generation(self, rid)
        ack: tuple[threading.Event, list] = (threading.Event(), [])
        self._gens[rid], self._acks[rid] = gen, ack
        self._send(("submit", rid, prompt, params, user))
        kind, answer = self._wait(ack)
        if kind == "error":
            self._gens.pop(rid, None)
            raise ValueError(answer)
        return gen

    def stats(self) -> tuple[dict, dict, dict]:
        """The worker engine's ``stats()``, ``user_service()`` and latency histograms."""
        rid = f"s{next(self._ids)}"
        ack: tuple[threading.Event, list] = (threading.Event(), [])
        self._acks[rid] = ack
        self._send(("stats", rid))
        kind, answer = self._wait(ack)
        if kind != "stats":
            raise RuntimeError(answer)
        return answer

    @staticmethod
    def _wait(ack: tuple[threading.Event, list]) -> tuple[str, object]:
        if not ack[0].wait(60):
            raise RuntimeError("the pagedq engine process did not answer")
        return ack[1][0]

    def abort(self, request_id: str) -> None:
        gen = self._gens.pop(request_id, None)
        if gen is not None and not self._closed:
            try:
                self._send(("abort", request_id))
            except (BrokenPipeError, OSError):
                pass
            gen._finish()

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            kind, rid = msg[0], msg[1]
            if kind in ("accepted", "error", "stats"):
                event, box = self._acks.pop(rid)
                box.append((kind, msg[2] if len(msg) > 2 else None))
                event.set()
            elif kind == "output":
                gen = self._gens.get(rid)
                if gen is not None:
                    gen._deliver(msg[2])
                    if msg[2].finished:
                        self._gens.pop(rid, None)
        # the worker is gone: fail whatever was running, wake whoever waits
        err = RuntimeError("the pagedq engine process exited")
        for event, box in self._acks.values():
            box.append(("error", str(err)))
            event.set()
        for gen in list(self._gens.values()):
            gen._finish(err)
        self._gens.clear()

    def close(self, timeout: float = 30) -> None:
        """Stop the worker: its engine aborts everything and frees its memory with the process."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
