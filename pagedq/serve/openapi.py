"""The OpenAPI 3.1 document of the API, generated from the pydantic models of
:mod:`pagedq.serve.protocol` (served at ``.../v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from . import protocol as p
from .config import ServeConfig

_REF = "#/components/schemas/{model}"


def _json(name: str) -> dict:
    return {"application/json": {"schema": {"$ref": _REF.format(model=name)}}}


def _errors(*statuses: int) -> dict:
    what = {
        400: "the request is invalid (the message names the field, the value and what is allowed) or over a limit",
        401: "missing or wrong API key",
        403: "not allowed (not logged in, or no access to this service)",
        404: "unknown model",
        413: "request body too large",
        429: "too many requests in flight for this user or this server; see Retry-After",
        500: "the engine failed this request (other requests were not affected)",
        503: "the engine is starting, restarting or the server is shutting down; see Retry-After",
    }
    out = {}
    for s in statuses:
        resp = {"description": what[s], "content": _json("ErrorResponse")}
        if s in (429, 503):
            resp["headers"] = {
                "Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}
            }
        out[str(s)] = resp
    return out


def _branches(prop: dict) -> list[dict]:
    """The non-null alternatives of a property's schema."""
    return [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]


def _bound_token_ids(schema, vocab_size: int) -> None:
    """Every integer schema with minimum 0 under a token-id property is a token id: < vocab_size."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer" and schema.get("minimum") == 0:
            schema["maximum"] = vocab_size - 1
        for v in schema.values():
            _bound_token_ids(v, vocab_size)
    elif isinstance(schema, list):
        for v in schema:
            _bound_token_ids(v, vocab_size)


def _limit_branches(prop: dict, kind: str, key: str, value: int) -> None:
    for b in _branches(prop):
        if b.get("type") == kind:
            b[key] = value


def _declare_request_limits(
    props: dict, config: ServeConfig, model: str | None, vocab_size: int | None
) -> None:
    for b in _branches(props["n"]):
        b["maximum"] = config.max_n
    for key in ("logprobs", "top_logprobs"):
        _limit_branches(props.get(key, {}), "integer", "maximum", config.max_logprobs)
    for key in ("stop", "stop_token_ids"):
        _limit_branches(props[key], "array", "maxItems", config.max_stop)
    if vocab_size:
        for key in ("stop_token_ids", "prompt"):
            if key in props:
                _bound_token_ids(props[key], vocab_size)
    for b in _branches(props["logit_bias"]):
        b["propertyNames"] = {"pattern": "^[0-9]+$"}
        b["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}
    if model is not None:
        props["model"]["anyOf"] = [{"type": "string", "enum": [model]}, {"type": "null"}]


def _declare_limits(schemas: dict, config: ServeConfig, model: str | None, vocab_size: int | None) -> None:
    """Write this server's limits into the request schemas, so that the document is the contract
    the server enforces (n, logprobs, stop conditions, prompts per request, token ids, model)."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _declare_request_limits(schemas[name]["properties"], config, model, vocab_size)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for b in _branches(prompt):
        items = b.get("items", {})
        if b.get("type") == "array" and "anyOf" in items:  # the list of several prompts
            b["maxItems"] = config.max_prompts


def document(
    prefix: str, config: ServeConfig, secured: bool, model: str | None = None, vocab_size: int | None = None
) -> dict:
    """The document for an app serving ``model`` at ``prefix`` (paths are relative to
    ``servers[0].url``), with this server's limits declared."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (p.CompletionRequest, "validation"),
        (p.ChatCompletionRequest, "validation"),
        (p.CompletionResponse, "serialization"),
        (p.ChatCompletionResponse, "serialization"),
        (p.ModelList, "serialization"),
        (p.ErrorResponse, "serialization"),
        (p.Health, "serialization"),
        (p.Readiness, "serialization"),
    ]
    _, schemas = models_json_schema(models, ref_template=_REF)
    _declare_limits(schemas["$defs"], config, model, vocab_size)
    gen_errors = _errors(400, 401, 403, 404, 429, 500, 503) if secured else _errors(400, 404, 429, 500, 503)
    auth_errors = _errors(401, 403) if secured else {}
    stream = {  # OpenAPI 3.1 has no itemSchema: this schema describes each event of the stream
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"type": "string", "enum": ["message", "error"]},
                    "data": {
                        "type": "string",
                        "description": "a chunk (JSON), '[DONE]' after the chunk carrying each choice's "
                        "finish_reason, or with event 'error' an error body (JSON) that ends the stream",
                    },
                },
            },
            "description": "with stream: true; ': keep-alive' comments while waiting",
        }
    }

    def generation(summary: str, request: str, response: str) -> dict:
        return {
            "post": {
                "summary": summary,
                "requestBody": {"required": True, "content": _json(request)},
                "responses": {
                    "200": {
                        "description": "the result, or its stream",
                        "content": {**_json(response), **stream},
                    },
                    **gen_errors,
                },
            }
        }

    paths = {
        "/v1/models": {
            "get": {
                "summary": "the served model",
                "responses": {
                    "200": {"description": "one model", "content": _json("ModelList")},
                    **auth_errors,
                },
            }
        },
        "/v1/completions": generation("text completion", "CompletionRequest", "CompletionResponse"),
        "/v1/chat/completions": generation(
            "chat completion", "ChatCompletionRequest", "ChatCompletionResponse"
        ),
        "/v1/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **auth_errors,
                },
            }
        },
        "/health": {
            "get": {
                "summary": "the server is up",
                "security": [],
                "responses": {"200": {"description": "up", "content": _json("Health")}},
            }
        },
        "/ready": {
            "get": {
                "summary": "the engine is loaded and serving",
                "security": [],
                "responses": {
                    "200": {"description": "ready", "content": _json("Readiness")},
                    "503": {
                        "description": "starting, restarting or draining",
                        "content": _json("Readiness"),
                        "headers": {"Retry-After": {"schema": {"type": "string"}}},
                    },
                },
            }
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "pagedq",
            "version": _version(),
            "description": (
                "OpenAI-compatible API of pagedq's shared engine. Limits of this server: "
                f"body <= {config.max_body_bytes} bytes, n <= {config.max_n}, <= {config.max_prompts} prompts "
                f"per request, logprobs <= {config.max_logprobs}, <= {config.max_stop} stop strings / ids, "
                f"<= {config.max_inflight_per_user} prompts in flight per user, <= {config.max_queued} in all."
            ),
        },
        "servers": [{"url": prefix.rstrip("/") or "/"}],
        "paths": paths,
        "components": {"schemas": schemas["$defs"]},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


def _version() -> str:
    from pagedq._version import __version__

    return __version__
