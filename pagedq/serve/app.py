"""The shared engine's HTTP app: routes, health and readiness, and ``pagedq serve``'s main loop.

One set of tornado handlers serves ``pagedq serve`` (this module's :func:`serve`), the
jupyter-server extension (:mod:`pagedq.jupyter_ext.serverext`, under ``<base_url>pagedq/`` and
the server's login) and the JupyterHub service (``pagedq serve --hub``, under
``/services/<name>/``). Tornado is jupyter-server's and JupyterHub's own web framework, so the
same handler classes run inside a Jupyter server unchanged.

Routes, under a prefix (``/`` standalone)::

    GET  health                 the server is up (no login)
    GET  ready                  the engine is loaded and serving (200) or not (503 + Retry-After)
    GET  v1/openapi.json        the generated OpenAPI document (no login)
    GET  v1/models              POST v1/completions   POST v1/chat/completions   GET v1/metrics

Shutdown (SIGTERM or SIGINT): new generation requests get 503, ``/ready`` turns false, running
requests may finish for ``grace_seconds``, then the rest end with an explicit error and the
engine process stops; it never outlives the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

import tornado.httpserver
import tornado.web

from pagedq.metrics import label_value, prometheus_text

from .admission import Admission
from .chat import ChatCompletionsHandler
from .completions import CompletionsHandler
from .config import MiB, ServeConfig
from .errors import APIError
from .handlers import BaseHandler, ServingState
from .identity import Identity, OpenAccess
from .openapi import document
from .page import PageHandler
from .protocol import Health, ModelCard, ModelList, Readiness
from .supervisor import EngineSupervisor

logger = logging.getLogger("pagedq.serve")


class HealthHandler(BaseHandler):
    async def get(self):
        self.send_json(Health())


class ReadyHandler(BaseHandler):
    async def get(self):
        sup, state = self.state.supervisor, self.state
        status = "draining" if state.draining else sup.state
        body = Readiness(status=status, model=state.model_name, detail=sup.last_error, restarts=sup.restarts)
        if status != "ready":
            self.set_header("Retry-After", str(max(1, round(sup.retry_after()))))
        self.send_json(body, 200 if status == "ready" else 503)


class OpenAPIHandler(BaseHandler):
    def initialize(self, state: ServingState, prefix: str = "/"):
        super().initialize(state)
        self.prefix = prefix

    async def get(self):
        secured = not isinstance(self.state.identity, OpenAccess)
        info = self.state.supervisor.info
        vocab = info.vocab_size if info else None
        self.send_json(document(self.prefix, self.state.config, secured, self.state.model_name, vocab))


class ModelsHandler(BaseHandler):
    async def get(self):
        await self.authenticate()
        info = self.state.supervisor.info
        card = ModelCard(id=self.state.model_name, max_model_len=info.max_model_len if info else None)
        self.send_json(ModelList(data=[card]))


class MetricsHandler(BaseHandler):
    """Prometheus text: the engine's counters (when it is up) and the server's own."""

    async def get(self):
        await self.authenticate()
        state, sup = self.state, self.state.supervisor
        text = ""
        if sup.ready:
            try:
                stats, users, latency = await sup.stats()
                text = prometheus_text(stats, state.model_name, users, latency)
            except APIError:
                pass  # the engine went away meanwhile: the server's own metrics still answer
        text += server_metrics(state)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(text)


def server_metrics(state: ServingState) -> str:
    sup = state.supervisor
    labels = f'model="{label_value(state.model_name)}"'
    lines = [
        "# HELP pagedq_engine_ready 1 when the engine process is loaded and serving",
        "# TYPE pagedq_engine_ready gauge",
        f"pagedq_engine_ready{{{labels}}} {1.0 if sup.ready and not state.draining else 0.0}",
        "# HELP pagedq_engine_restarts_total engine processes restarted after they died",
        "# TYPE pagedq_engine_restarts_total counter",
        f"pagedq_engine_restarts_total{{{labels}}} {float(sup.restarts)}",
        "# HELP pagedq_prompts_in_flight prompts queued or running, counted by admission control",
        "# TYPE pagedq_prompts_in_flight gauge",
        f"pagedq_prompts_in_flight{{{labels}}} {float(state.admission.total)}",
        "# HELP pagedq_http_errors_total requests answered with an error, by status",
        "# TYPE pagedq_http_errors_total counter",
    ]
    for status, count in sorted(state.rejected.items()):
        lines.append(f'pagedq_http_errors_total{{{labels},status="{status}"}} {float(count)}')
    lines += [
        "# HELP pagedq_label_requests_total requests per label (the body's user where it is not the user), "
        "for the most recent max_labels labels",
        "# TYPE pagedq_label_requests_total counter",
    ]
    for label, count in sorted(state.labels.items()):
        lines.append(f'pagedq_label_requests_total{{{labels},label="{label_value(label)}"}} {float(count)}')
    return "\n".join(lines) + "\n"


API_HANDLERS = {
    "v1/models": ModelsHandler,
    "v1/completions": CompletionsHandler,
    "v1/chat/completions": ChatCompletionsHandler,
    "v1/metrics": MetricsHandler,
}
OPEN_HANDLERS = {"health": HealthHandler, "ready": ReadyHandler}
PAGE_HANDLERS = {"": PageHandler}


def routes(state: ServingState, prefix: str = "/", wrap=None) -> list[tuple]:
    """The app's tornado routes under ``prefix``; ``wrap(cls)`` adapts each handler class (the
    jupyter-server extension puts the server's own handler base in front)."""
    prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
    wrap = wrap or (lambda cls: cls)
    handlers = {**OPEN_HANDLERS, **API_HANDLERS, **PAGE_HANDLERS}
    out: list[tuple[str, type, dict[str, Any]]] = [
        (prefix + path, wrap(cls), {"state": state}) for path, cls in handlers.items()
    ]
    out.append((prefix + "v1/openapi.json", wrap(OpenAPIHandler), {"state": state, "prefix": prefix}))
    return out + state.identity.extra_routes(prefix)


def make_state(
    model: str,
    engine_options: dict | None = None,
    config: ServeConfig | None = None,
    identity: Identity | None = None,
) -> ServingState:
    config = config or ServeConfig()
    config.validate()
    identity = identity or OpenAccess()
    options = dict(engine_options or {})
    if identity.weights:
        options["user_weights"] = {**identity.weights, **(options.get("user_weights") or {})}
    options.setdefault("scheduling_policy", "fair")
    return ServingState(EngineSupervisor(model, options, config), config, identity, Admission(config))


def make_app(state: ServingState, prefix: str = "/") -> tornado.web.Application:
    # the secret signs the login cookies of the hub's OAuth (a restart asks people to log in again)
    return tornado.web.Application(routes(state, prefix), cookie_secret=os.urandom(32))


class Server:
    """``pagedq serve``: the app on ``host:port`` and its engine process, until a signal."""

    def __init__(self, state: ServingState, host: str = "127.0.0.1", port: int = 8000, prefix: str = "/"):
        self.state, self.host, self.port, self.prefix = state, host, port, prefix
        self.http: tornado.httpserver.HTTPServer | None = None
        self._stop: asyncio.Event | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # bodies up to a hard cap reach the handler, which refuses them with a clear 400
        cap = max(4 * self.state.config.max_body_bytes, self.state.config.max_body_bytes + MiB)
        self.http = tornado.httpserver.HTTPServer(make_app(self.state, self.prefix), max_body_size=cap)
        self.http.listen(self.port, self.host)
        sup = self.state.supervisor
        sup.start()
        url = f"http://{self.host}:{self.port}{self.prefix.rstrip('/')}/v1"
        logger.info("listening at http://%s:%d%s; loading %r", self.host, self.port, self.prefix, sup.model)
        ready: asyncio.Future[Any] = loop.run_in_executor(None, sup.wait_ready)
        done, _ = await asyncio.wait(
            [ready, asyncio.ensure_future(self._stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done:
            print(
                f"pagedq: serving {self.state.model_name!r} at {url} (OpenAI-compatible; Ctrl-C stops)",
                flush=True,
            )
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        await drain(self.state)
        if self.http is not None:
            self.http.stop()
            await self.http.close_all_connections()


async def drain(state: ServingState) -> None:
    """Stop serving: refuse new work (503), let running requests finish within the grace period,
    then end the rest with explicit errors and stop the engine process."""
    sup, loop = state.supervisor, asyncio.get_running_loop()
    state.draining = True
    grace = state.config.grace_seconds
    logger.warning("shutting down; %d prompts in flight get up to %.0f s", sup.num_inflight(), grace)
    deadline = loop.time() + grace
    while sup.num_inflight() and loop.time() < deadline:
        await asyncio.sleep(0.1)
    left = sup.num_inflight()
    if left:
        logger.warning("ending %d prompts that did not finish in the grace period", left)
    await loop.run_in_executor(None, sup.close)
    await asyncio.sleep(0.2)  # let the handlers write their error events


def serve(
    model: str,
    engine_options: dict | None = None,
    config: ServeConfig | None = None,
    identity: Identity | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    prefix: str = "/",
) -> None:
    """Serve ``model`` until SIGTERM or SIGINT (``pagedq serve``)."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)  # start, ready, deaths, restarts and shutdown are always told
    state = make_state(model, engine_options, config, identity)
    server = Server(state, host, port, prefix)
    try:
        asyncio.run(server.run())
    finally:
        state.supervisor.close()
