"""JupyterHub service mode: one engine for every user of a hub, on JupyterHub's own auth library.

Under JupyterHub each user has a single-user server of their own, so the jupyter-server
extension would give each user an engine. ``pagedq serve --hub`` runs instead as a hub service
(``c.JupyterHub.services``), reached through the hub's proxy at ``/services/<name>/``. Who
calls is decided by ``jupyterhub.services.auth.HubOAuth`` — the class JupyterHub provides for
services — configured from the environment JupyterHub gives a managed service:

* a token (``Authorization: token|Bearer <token>``: a kernel's ``$JUPYTERHUB_API_TOKEN``, a
  user's API token) or, for people, the OAuth login cookie of this service;
* the caller must hold the service's access scope (``access:services!service=<name>``, from
  ``$JUPYTERHUB_OAUTH_ACCESS_SCOPES``) — a user whose roles do not grant it, a token scoped
  without it, or another service's token gets 403;
* answers are cached as JupyterHub intends (``HubAuth.cache_max_age``), except that a refusal is
  remembered for a few seconds only, so a token that just became valid is not refused for long;
* a cookie-authenticated request that changes something must carry JupyterHub's XSRF token;
* the hub being unreachable is a 503 that does not show its internal URL.

The user's name is the fair-share key: the body's ``user`` field never is.
"""

from __future__ import annotations

import logging
import os
import time

from pagedq.serve.errors import APIError
from pagedq.serve.identity import Identity

logger = logging.getLogger("pagedq.serve")

REFUSAL_SECONDS = 5.0  # how long a refused token stays refused without asking the hub again


def hub_auth_class():
    """HubOAuth, remembering refusals only briefly (JupyterHub caches them as long as answers)."""
    from jupyterhub.services.auth import HubOAuth

    class PagedqHubOAuth(HubOAuth):
        _refused: dict[str, float]

        async def _check_hub_authorization(self, url, api_token, cache_key=None, use_cache=True):
            refused = self.__dict__.setdefault("_refused", {})
            now = time.monotonic()
            if cache_key in refused and refused[cache_key] < now:
                del refused[cache_key]
                self.cache.pop(cache_key, None)  # ask the hub again
            model = await super()._check_hub_authorization(url, api_token, cache_key, use_cache)
            if model is None and use_cache and cache_key is not None:
                refused[cache_key] = now + REFUSAL_SECONDS
                for key in [k for k, t in refused.items() if t < now][:1000]:
                    del refused[key]
            return model

    return PagedqHubOAuth


class HubIdentity(Identity):
    """The hub user (or service) behind a request's token or login cookie, with the scope to
    access this service."""

    def __init__(self, hub_auth=None):
        if hub_auth is None:
            missing = [v for v in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_API_URL") if not os.environ.get(v)]
            if missing:
                raise ValueError(
                    f"hub mode runs as a JupyterHub service, which sets {', '.join(missing)}; "
                    "add pagedq to c.JupyterHub.services (see the README)"
                )
            hub_auth = hub_auth_class()(cache_max_age=60)
        self.hub_auth = hub_auth

    @property
    def scopes(self) -> set[str]:
        return set(self.hub_auth.access_scopes or ())

    async def authenticate(self, handler) -> str:
        from tornado.web import HTTPError

        try:
            model = await self.hub_auth.get_user(handler, sync=False)
        except Exception as e:  # the hub is down or misconfigured: tell the log, not the caller
            detail = getattr(e, "log_message", None) or f"{type(e).__name__}: {e}"  # tornado's HTTPError
            logger.error("asking JupyterHub who calls failed: %s", detail)
            raise APIError(
                "the hub cannot tell who you are right now; retry later", 503, retry_after=5
            ) from None
        if (
            model is None
            and handler.request.method not in ("GET", "HEAD")
            and handler.get_cookie(self.hub_auth.cookie_name)
        ):
            raise APIError(
                "a request authenticated by the login cookie needs JupyterHub's XSRF token; API clients send "
                "their token instead",
                403,
            )
        if model is None:
            raise APIError(
                "not logged in to the hub: send 'Authorization: token <JupyterHub token>' "
                "($JUPYTERHUB_API_TOKEN in your server) or log in",
                403,
                code="login_required",
            )
        kind, name = model.get("kind", "user"), model["name"]
        if self.scopes and not self.hub_auth.check_scopes(self.scopes, model):
            raise APIError(
                f"{kind} {name!r} may not use this service: it needs the scope {' or '.join(sorted(self.scopes))} "
                "(a role that grants it, and for a server's token c.Spawner.server_token_scopes)",
                403,
            )
        if not getattr(handler, "_token_authenticated", False) and handler.request.method not in (
            "GET",
            "HEAD",
        ):
            try:
                self.hub_auth.check_xsrf_cookie(handler)
            except HTTPError:
                raise APIError(
                    "a request authenticated by the login cookie needs the XSRF token; API clients send their "
                    "token instead",
                    403,
                ) from None
        return name if kind == "user" else f"{kind}:{name}"

    def login_url(self, handler) -> str | None:
        """The hub's OAuth login, coming back to this request's URL."""
        from tornado.httputil import url_concat

        auth = self.hub_auth
        params: dict[str, str] = {}
        verifier = None
        if auth.pkce_enabled:
            verifier, challenge, method = auth.generate_pkce_code_challenge()
            params.update(code_challenge=challenge, code_challenge_method=method)
        params["state"] = auth.set_state_cookie(handler, next_url=handler.request.uri, code_verifier=verifier)
        return url_concat(auth.login_url, params)

    def extra_routes(self, prefix: str) -> list[tuple]:
        """The OAuth callback at ``<prefix>oauth_callback``."""
        from jupyterhub.services.auth import HubOAuthCallbackHandler

        class Callback(HubOAuthCallbackHandler):
            def initialize(self, hub_auth):
                self.hub_auth = hub_auth

        return [(prefix + "oauth_callback", Callback, {"hub_auth": self.hub_auth})]


def service_prefix() -> str:
    """Where the hub's proxy sends this service's requests (``/services/<name>/``)."""
    return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/pagedq/")
