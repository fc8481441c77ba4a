"""JupyterHub managed-service mode: one engine for every user of a hub.

Under JupyterHub each user has a single-user server of their own, so the jupyter-server
extension would give each user an engine. ``pagedq serve --hub`` runs instead as a hub service
(``c.JupyterHub.services``), reached through the hub's proxy at ``/services/<name>/v1``; it
learns who sends a request by asking the Hub API about the request's token
(``GET $JUPYTERHUB_API_URL/user`` with ``Authorization: token <token>``, the documented way for
services to identify a token's owner), caches the answer briefly, and queues the request under
that user's name for the fair-share scheduler. A request without a valid hub token gets a 403;
the body's ``user`` field is ignored, so nobody spends another user's share.
"""

from __future__ import annotations

import json
import os
import re
import time

from pagedq.serve.errors import APIError
from pagedq.serve.identity import Identity

_TOKEN = re.compile(r"(?:token|bearer)\s+(\S+)", re.IGNORECASE)


class HubIdentity(Identity):
    """The hub user owning the request's token."""

    def __init__(self, api_url: str | None = None, ttl: float = 60.0):
        self.api_url = (api_url or os.environ.get("JUPYTERHUB_API_URL", "")).rstrip("/")
        if not self.api_url:
            raise ValueError(
                "hub mode needs the Hub API's URL: run as a JupyterHub service (JupyterHub sets "
                "JUPYTERHUB_API_URL) or set JUPYTERHUB_API_URL"
            )
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def authenticate(self, handler) -> str:
        m = _TOKEN.match(handler.request.headers.get("Authorization", ""))
        token = m.group(1) if m else handler.get_argument("token", "")
        if not token:
            raise APIError(
                "no hub token: send 'Authorization: Bearer <your JupyterHub API token>' "
                "($JUPYTERHUB_API_TOKEN in your server)",
                status=403,
                kind="authentication_error",
            )
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is None or now - hit[0] > self.ttl:
            hit = (now, await self._ask_hub(token))
            self._cache[token] = hit
        if hit[1] is None:
            raise APIError("the hub does not know this token", status=403, kind="authentication_error")
        return hit[1]

    async def _ask_hub(self, token: str) -> str | None:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        try:
            resp = await AsyncHTTPClient().fetch(
                f"{self.api_url}/user", headers={"Authorization": f"token {token}"}, request_timeout=10
            )
        except HTTPClientError as e:
            if e.code in (401, 403, 404):
                return None
            raise APIError(f"the hub did not answer: {e}", status=502, kind="server_error") from None
        except OSError as e:
            raise APIError(
                f"the hub is unreachable at {self.api_url}: {e}", status=502, kind="server_error"
            ) from None
        return json.loads(resp.body).get("name")


def service_prefix() -> str:
    """Where the hub's proxy sends this service's requests (``/services/<name>/``)."""
    return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/pagedq/")
