"""``ServeConfig``: the one definition of every option of the shared engine's server.

``pagedq serve`` derives its command-line flags from these fields (:func:`add_arguments`), and
the jupyter-server extension its traits; the README's table lists them with these defaults.
Admission limits make a request that is too large a clear 400, and a caller or a server that is
too busy a 429 with ``Retry-After``, before anything reaches the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from pagedq.checks import Range

MiB = 2**20


def _opt(default, help: str, **range_kw):
    return field(default=default, metadata={"help": help, "range": range_kw})


@dataclass
class ServeConfig:
    """Options of the serving layer (the engine's own options are ``EngineConfig``'s)."""

    served_model_name: str | None = _opt(None, "the model id clients send and see (default: the folder name)")
    max_body_bytes: int = _opt(8 * MiB, "largest request body accepted (bytes); larger -> 400", ge=1)
    max_n: int = _opt(16, "most samples per prompt (n); more -> 400", ge=1)
    max_prompts: int = _opt(32, "most prompts in one completions request; more -> 400", ge=1)
    max_logprobs: int = _opt(20, "largest logprobs / top_logprobs (vLLM's cap); larger -> 400", ge=0)
    max_stop: int = _opt(16, "most stop strings and most stop token ids per request; more -> 400", ge=0)
    max_inflight_per_user: int = _opt(
        64, "most prompts one user may have queued or running; more -> 429 with Retry-After", ge=1
    )
    max_queued_per_user: int = _opt(
        32, "most prompts one user may have waiting for their first token; more -> 429 with Retry-After", ge=1
    )
    max_queued: int = _opt(
        1024, "most prompts queued or running for everyone together; more -> 429 with Retry-After", ge=1
    )
    max_labels: int = _opt(
        100, "most request labels (the body's user, where it is not the user) kept in the metrics", ge=0
    )
    keepalive_seconds: float = _opt(
        5.0, "interval of SSE keep-alive comments while a stream waits or computes", gt=0
    )
    grace_seconds: float = _opt(
        30.0, "on SIGTERM/SIGINT, how long running requests may finish before they are ended", ge=0
    )
    restart_backoff_seconds: float = _opt(
        1.0, "first wait before restarting a dead engine process (doubles up to the max)", gt=0
    )
    restart_backoff_max_seconds: float = _opt(30.0, "longest wait between engine restarts", gt=0)
    engine_start_timeout: float = _opt(600.0, "seconds the engine process may take to load the model", gt=0)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "served_model_name":
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"served_model_name must be a non-empty string or None, got {value!r}")
                continue
            kind = int if str(f.type) == "int" else float
            Range(kind, **f.metadata["range"]).check(f.name, value)
        if self.restart_backoff_max_seconds < self.restart_backoff_seconds:
            raise ValueError(
                "restart_backoff_max_seconds must be >= restart_backoff_seconds, got "
                f"{self.restart_backoff_max_seconds} < {self.restart_backoff_seconds}"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`ServeConfig` field, with its help and default."""
    for f in dataclasses.fields(ServeConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default: {f.default})"
        )


def from_arguments(args: argparse.Namespace) -> ServeConfig:
    config = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    config.validate()
    return config
