"""The jupyter-server extension: one shared engine for every notebook of a Jupyter server.

Installed with pagedq and enabled by the wheel's
``etc/jupyter/jupyter_server_config.d/pagedq.json``, it serves :mod:`pagedq.serve`'s app at
``<base_url>pagedq/`` (the API at ``<base_url>pagedq/v1``) behind the server's own login: a
token (``Authorization: Bearer <token>`` works, so the ``openai`` client needs only ``base_url``
and ``api_key``) or the login cookie, with jupyter-server's XSRF check for cookie requests kept
in force. The engine runs in a supervised process (:class:`~pagedq.serve.supervisor.EngineSupervisor`),
started on the first request (or with the server: ``preload``), restarted if it dies, and
drained then stopped with the server, so the server never blocks on a forward pass and an
engine crash leaves everyone's notebooks up. Configure with traits, e.g.::

    jupyter lab --PagedqExtension.model=/models/llama-3.2-1b \\
        --PagedqExtension.engine_options='{"dtype": "bfloat16", "kv_cache_memory": "4GiB"}'

Who calls is jupyter-server's identity provider's answer: the logged-in user; a request made
with the server's token (``pagedq.connect()``, ``openai`` clients) is the server's owner —
one stable user, not a new anonymous one per request. Kernels reach the engine with
``pagedq.connect()`` and ``%%generate --shared``.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Unicode

from pagedq.serve.app import OPEN_HANDLERS, PAGE_HANDLERS, drain, make_state, routes
from pagedq.serve.config import ServeConfig
from pagedq.serve.errors import APIError
from pagedq.serve.identity import Identity


class ServerIdentity(Identity):
    """The user jupyter-server's identity provider names; token requests are the owner's."""

    def __init__(self, owner: str):
        self.owner = owner

    async def authenticate(self, handler) -> str:
        user = handler.current_user
        if user is None:
            raise APIError(
                "not logged in to the Jupyter server: send 'Authorization: Bearer <server token>'",
                403,
                code="login_required",
            )
        if type(handler.identity_provider).__module__.startswith("jupyter_server.auth"):
            # jupyter-server's own providers (token, password): everyone holding the token or the
            # password is the server's owner (they name each token request a new anonymous user)
            return self.owner
        return user.username  # JupyterHub's single-user provider and others know the person

    def login_url(self, handler) -> str | None:
        from tornado.httputil import url_concat

        return url_concat(handler.get_login_url(), {"next": handler.request.uri})


def _behind_login(cls):
    """``cls`` with jupyter-server's handler in front (authentication, XSRF for cookie requests,
    CORS, host checks), and pagedq's errors and connection handling kept. The page for people
    gets jupyter-server's page handler (HTML, login redirects), the API its JSON API handler."""
    base = JupyterHandler if cls in PAGE_HANDLERS.values() else APIHandler

    class Handler(base, cls):
        def write_error(self, status_code: int, **kwargs):
            return cls.write_error(self, status_code, **kwargs)

        def _handle_request_exception(self, e):
            return cls._handle_request_exception(self, e)

        def on_connection_close(self):
            return cls.on_connection_close(self)

        def on_finish(self):
            cls.on_finish(self)
            base.on_finish(self)

    if cls in OPEN_HANDLERS.values():  # health and readiness answer without a login
        setattr(Handler.get, "__allow_unauthenticated", True)  # what jupyter-server's decorator sets
    Handler.__name__ = f"Shared{cls.__name__}"
    return Handler


class PagedqExtension(ExtensionApp):
    name = "pagedq"
    description = "pagedq's shared engine, with an OpenAI-compatible API under <base_url>pagedq/v1"

    model = Unicode("pagedq-tiny", config=True, help="model folder (or pagedq-tiny, the bundled model)")
    engine_options = Dict(
        config=True,
        help="keyword arguments of pagedq.LLM (the fields of pagedq.EngineConfig), e.g. {'dtype': "
        "'bfloat16', 'kv_cache_memory': '4GiB'}; scheduling_policy defaults to 'fair'",
    )
    preload = Bool(
        False, config=True, help="start the engine with the server instead of on the first request"
    )
    serve_options = Dict(
        config=True,
        help="options of the serving layer (pagedq.serve.config.ServeConfig): limits, keep-alive, grace period, "
        "restart backoff, served_model_name; e.g. {'max_inflight_per_user': 16}",
    )

    def initialize_handlers(self):
        # the engine's start, deaths, restarts and shutdown go to the server's own log
        log = logging.getLogger("pagedq.serve")
        log.setLevel(logging.INFO)
        log.handlers = list(self.log.handlers) or log.handlers
        log.propagate = not self.log.handlers
        known = {f.name for f in dataclasses.fields(ServeConfig)}
        unknown = sorted(set(self.serve_options) - known)
        if unknown:
            raise ValueError(
                f"PagedqExtension.serve_options has unknown keys {unknown}; known: {sorted(known)}"
            )
        options = dict(self.engine_options)
        self.state = make_state(
            self.model, options, ServeConfig(**self.serve_options), ServerIdentity(getpass.getuser())
        )
        prefix = self.serverapp.base_url.rstrip("/") + "/pagedq/"
        self.handlers.extend(routes(self.state, prefix, wrap=_behind_login))
        if self.preload:
            self.state.supervisor.start()

    async def stop_extension(self):
        """Drain (running requests get the grace period), then stop the engine process."""
        state = getattr(self, "state", None)
        if state is not None:
            await drain(state)


def _jupyter_server_extension_points():
    return [{"module": "pagedq.jupyter_ext.serverext", "app": PagedqExtension}]
