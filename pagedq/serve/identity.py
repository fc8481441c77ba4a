"""Who is calling: every request gets one stable user, decided by a trusted party.

The user is the key of fair sharing and of the per-user limits, so it is never what the caller
writes into the body. Each face of the shared engine has its own way to know it:

* ``pagedq serve`` with ``--api-keys FILE`` (:class:`ApiKeys`): each key belongs to a user
  (and a fair-share weight); with ``--api-key KEY`` one key is the user ``default``;
* ``pagedq serve`` without keys (:class:`OpenAccess`): everyone is ``anonymous`` — one user —
  unless the operator opts in to the body's ``user`` field (``--trust-request-user``);
* the jupyter-server extension: jupyter-server's identity provider
  (:mod:`pagedq.jupyter_ext.serverext`);
* the JupyterHub service: JupyterHub's ``HubOAuth`` (:mod:`pagedq.jupyter_ext.hub`).

Keys are compared in constant time (``hmac.compare_digest``) against every key.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from types import MappingProxyType

from pagedq.checks import Range

from .errors import APIError

_BEARER = re.compile(r"Bearer\s+(\S+)\s*$", re.IGNORECASE)


class Identity:
    """Decides who sends a request: ``await authenticate(handler)`` (the authenticated user, or
    None where nobody authenticates; raises :class:`APIError` 401/403), then
    ``user_for(principal, body_user)`` (the user the request is served as)."""

    #: users' fair-share weights known to this identity (for the engine's ``user_weights``)
    weights: Mapping[str, float] = MappingProxyType({})

    async def authenticate(self, handler) -> str | None:
        raise NotImplementedError

    def user_for(self, principal: str | None, body_user: str | None) -> str:
        return principal or "anonymous"

    def login_url(self, handler) -> str | None:
        """Where a person who is not logged in should go (the page redirects there); None if
        there is no login for people."""
        return None

    def extra_routes(self, prefix: str) -> list[tuple]:
        """Routes this identity needs under the app's prefix (the hub's OAuth callback)."""
        return []


class OpenAccess(Identity):
    """No authentication: one user for everyone, or the body's ``user`` if the operator trusts it."""

    def __init__(self, trust_request_user: bool = False):
        self.trust_request_user = trust_request_user

    async def authenticate(self, handler) -> str | None:
        return None

    def user_for(self, principal: str | None, body_user: str | None) -> str:
        if self.trust_request_user and body_user:
            return body_user
        return "anonymous"


def bearer_token(handler) -> str | None:
    m = _BEARER.match(handler.request.headers.get("Authorization", ""))
    return m.group(1) if m else None


class ApiKeys(Identity):
    """API keys, each belonging to a user: ``Authorization: Bearer <key>``."""

    def __init__(self, keys: dict[str, tuple[str, float]]):
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._keys = [(k.encode(), user) for k, (user, _) in keys.items()]
        self.weights = {user: w for user, w in keys.values() if w != 1.0}

    @classmethod
    def single(cls, key: str) -> ApiKeys:
        return cls({key: ("default", 1.0)})

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """Lines of ``KEY USER [WEIGHT]``; blank lines and ``#`` comments are skipped."""
        keys: dict[str, tuple[str, float]] = {}
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) not in (2, 3):
                    raise ValueError(f"{path}:{n}: expected 'KEY USER [WEIGHT]', got {line.strip()!r}")
                weight = 1.0
                if len(fields) == 3:
                    try:
                        weight = float(fields[2])
                    except ValueError:
                        raise ValueError(
                            f"{path}:{n}: the weight must be a number, got {fields[2]!r}"
                        ) from None
                    Range(float, gt=0).check(f"{path}:{n}: weight", weight)
                if fields[0] in keys:
                    raise ValueError(f"{path}:{n}: the key of user {fields[1]!r} is listed twice")
                keys[fields[0]] = (fields[1], weight)
        if not keys:
            raise ValueError(f"{path} lists no API key (lines of 'KEY USER [WEIGHT]')")
        return cls(keys)

    async def authenticate(self, handler) -> str | None:
        token = bearer_token(handler)
        if token is None:
            raise APIError("missing API key: send 'Authorization: Bearer <key>'", 401)
        given = token.encode()
        user = None
        for key, owner in self._keys:  # compare with every key: the time does not tell which matched
            if hmac.compare_digest(given, key):
                user = owner
        if user is None:
            raise APIError("wrong API key", 401)
        return user
