"""Errors for HTTP callers, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a caller can see is an :class:`APIError` with a status chosen here: 400 for a
request that is wrong (its message names the field, the value and what is allowed), 401/403 for
who may call, 404 for an unknown model, 429 and 503 (with ``Retry-After``) for a server that is
busy or whose engine is (re)starting, 500 only for a request the engine itself failed.
"""

from __future__ import annotations

import math


class APIError(Exception):
    """An error for the client: status, OpenAI error body, and extra headers."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        kind: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.kind = kind or _KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


_KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)


def unavailable(message: str, retry_after: float) -> APIError:
    return APIError(message, 503, retry_after=retry_after)


def too_many(message: str, retry_after: float = 1.0) -> APIError:
    return APIError(message, 429, retry_after=retry_after)


def from_validation_error(error) -> APIError:
    """A pydantic ``ValidationError`` as one 400 naming every bad field, its value and the rule."""
    parts, first = [], None
    for e in error.errors(include_url=False)[:5]:
        loc = ".".join(str(x) for x in e["loc"])
        first = first or loc or None
        if e["type"] in ("json_invalid", "json_type"):
            parts.append(f"the request body is not valid JSON: {e['msg'].removeprefix('Invalid JSON: ')}")
            continue
        if e["type"] == "model_type" and not loc:
            parts.append("the request body must be a JSON object")
            continue
        where = loc or "the request body"
        if e["type"] == "missing":
            parts.append(f"{where} is required")
            continue
        value = e.get("input")
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        parts.append(f"{where}: {e['msg'][:1].lower()}{e['msg'][1:]}, got {shown}")
    return APIError("; ".join(parts) or str(error), 400, first)
