"""The jupyter-server extension: one shared engine for every notebook of a Jupyter server.

Installed with pagedq and enabled by the wheel's
``etc/jupyter/jupyter_server_config.d/pagedq.json``, it serves the OpenAI-compatible API of
:mod:`pagedq.jupyter_ext.openai_api` at ``<base_url>pagedq/v1`` behind the server's own login
(a token or the login cookie; ``Authorization: Bearer <token>`` works, so the ``openai`` client
needs only ``base_url`` and ``api_key``). Requests are attributed to the logged-in user, so the
engine's fair-share scheduler shares it between users. The engine runs in a worker process
(:class:`~pagedq.jupyter_ext.worker.RemoteDriver`), started on the first request (or at server
start with ``preload``) and stopped with the server, so the server never blocks on a forward
pass and an engine crash leaves the server up. Configure with traits, e.g.::

    jupyter lab --PagedqExtension.model=/models/llama-3.2-1b \\
        --PagedqExtension.engine_options='{"dtype": "bfloat16", "kv_cache_memory": "4GiB"}'

Kernels reach it with ``pagedq.connect()`` and ``%%generate --shared``.
"""

from __future__ import annotations

import asyncio
import threading

from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Unicode

from . import openai_api as api


class SharedBackend(api.Backend):
    """A :class:`~pagedq.jupyter_ext.openai_api.Backend` whose engine process starts on demand."""

    def __init__(self, app: PagedqExtension):
        super().__init__(None, app.served_model_name or "")
        self.app = app
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._error: str | None = None

    def start(self) -> None:
        with self._lock:
            if self._started.is_set() or self.driver is not None:
                return
            threading.Thread(target=self._start, name="pagedq-engine-start", daemon=True).start()

    def _start(self) -> None:
        from .worker import RemoteDriver

        try:
            options = {"scheduling_policy": self.app.scheduling_policy, **self.app.engine_options}
            self.driver = RemoteDriver(self.app.model, options)
            self.model_name = self.app.served_model_name or self.driver.model_name
            self.app.log.info(
                "pagedq: engine for %r is up at %spagedq/v1", self.app.model, self.app.serverapp.base_url
            )
        except Exception as e:
            self._error = str(e)
            self.app.log.error("pagedq: the engine did not start: %s", e)
        finally:
            self._started.set()

    async def ensure(self) -> None:
        self.start()
        while not self._started.is_set():
            await asyncio.sleep(0.05)
        if self.driver is None:
            raise api.APIError(
                f"the shared engine is not available: {self._error}", status=503, kind="server_error"
            )

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()


def _login_user(handler) -> str:
    user = handler.current_user
    return getattr(user, "username", None) or str(user)


def _behind_login(cls):
    """``cls`` with jupyter-server's authentication in front (APIHandler first in the MRO), and
    errors still in OpenAI's shape."""

    class Handler(APIHandler, cls):
        async def prepare(self):
            await super().prepare()
            # jupyter-server lets unauthenticated requests through to handlers that do not
            # check (allow_unauthenticated_access defaults to True): this one checks
            if self.current_user is None:
                raise api.APIError(
                    "not logged in to the Jupyter server: send 'Authorization: Bearer <server token>'",
                    status=403,
                    kind="authentication_error",
                )

        def write_error(self, status_code: int, **kwargs):
            return cls.write_error(self, status_code, **kwargs)

        def _handle_request_exception(self, e):
            return cls._handle_request_exception(self, e)

        def on_connection_close(self):
            return cls.on_connection_close(self)

    Handler.__name__ = f"Shared{cls.__name__}"
    return Handler


class PagedqExtension(ExtensionApp):
    name = "pagedq"
    description = "pagedq's shared engine, with an OpenAI-compatible API under <base_url>pagedq/v1"

    model = Unicode("pagedq-tiny", config=True, help="model folder (or pagedq-tiny, the bundled model)")
    engine_options = Dict(
        config=True,
        help="keyword arguments of pagedq.LLM, e.g. {'dtype': 'bfloat16', 'kv_cache_memory': '4GiB'}",
    )
    scheduling_policy = Unicode("fair", config=True, help="fair (per-user share) or fcfs")
    served_model_name = Unicode(
        None, allow_none=True, config=True, help="model id for clients (default: folder name)"
    )
    preload = Bool(
        False, config=True, help="start the engine with the server instead of on the first request"
    )

    def initialize_handlers(self):
        self.backend = SharedBackend(self)
        for pattern, cls, kwargs in api.routes("/pagedq/v1", self.backend, user_of=_login_user):
            self.handlers.append((pattern, _behind_login(cls), kwargs))
        if self.preload:
            self.backend.start()

    async def stop_extension(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            await asyncio.get_running_loop().run_in_executor(None, backend.close)


def _jupyter_server_extension_points():
    return [{"module": "pagedq.jupyter_ext.serverext", "app": PagedqExtension}]
