"""Admission control: what the server refuses before anything reaches the engine.

Two kinds of limits (all in :class:`~pagedq.serve.config.ServeConfig`, with documented
defaults). A request that is too large — too many prompts, samples, log-probabilities or stop
conditions — is refused with a 400 that names the field, its value and the limit (and the
option that sets it). A caller or a server that is too busy — too many prompts in flight for one
user, or waiting for their first token for one user, or in flight for everyone — gets a 429 with
``Retry-After``; the prompts counted are those queued or running in the engine, released when
each ends. Users with nothing in flight leave the tables at once.
"""

from __future__ import annotations

import threading

from pagedq.sampling_params import SamplingParams

from .config import ServeConfig
from .errors import bad_request, too_many


class Admission:
    def __init__(self, config: ServeConfig):
        self.config = config
        self._lock = threading.Lock()
        self.total = 0
        self.per_user: dict[str, int] = {}  # users with prompts in flight (others are dropped)
        self.queued: dict[str, int] = {}  # of those, prompts that have no token yet

    def check_request(
        self, num_prompts: int, params: SamplingParams, logprobs_field: str = "logprobs"
    ) -> None:
        """400 for a request larger than the server's limits."""
        c = self.config
        if num_prompts > c.max_prompts:
            raise bad_request(
                f"prompt holds {num_prompts} prompts; this server takes at most {c.max_prompts} per request "
                "(max_prompts)",
                "prompt",
            )
        if params.n > c.max_n:
            raise bad_request(f"n must be <= {c.max_n} on this server (max_n), got {params.n}", "n")
        if params.logprobs is not None and params.logprobs > c.max_logprobs:
            raise bad_request(
                f"{logprobs_field} must be <= {c.max_logprobs} on this server (max_logprobs), got {params.logprobs}",
                logprobs_field,
            )
        for name, values in (("stop", params.stop_strings), ("stop_token_ids", params.stop_token_ids)):
            if len(values) > c.max_stop:
                raise bad_request(
                    f"{name} holds {len(values)} entries; this server takes at most {c.max_stop} (max_stop)",
                    name,
                )

    def acquire(self, user: str, count: int) -> None:
        """Count ``count`` prompts of ``user`` in flight, or raise 429 if that is over a limit."""
        c = self.config
        with self._lock:
            mine = self.per_user.get(user, 0)
            waiting = self.queued.get(user, 0)
            if waiting + count > c.max_queued_per_user:
                raise too_many(
                    f"user {user!r} has {waiting} prompts waiting for their first token and this request adds "
                    f"{count}; the limit is {c.max_queued_per_user} per user (max_queued_per_user): retry when "
                    "they start"
                )
            if mine + count > c.max_inflight_per_user:
                raise too_many(
                    f"user {user!r} has {mine} prompts queued or running and this request adds {count}; "
                    f"the limit is {c.max_inflight_per_user} per user (max_inflight_per_user): retry when some finish"
                )
            if self.total + count > c.max_queued:
                raise too_many(
                    f"the server has {self.total} prompts queued or running and this request adds {count}; "
                    f"the limit is {c.max_queued} (max_queued): retry later",
                    retry_after=2.0,
                )
            self.per_user[user] = mine + count
            self.queued[user] = waiting + count
            self.total += count

    def started(self, user: str) -> None:
        """One of ``user``'s prompts produced its first token: it is no longer queued."""
        with self._lock:
            _drop(self.queued, user, 1)

    def release(self, user: str, count: int = 1, queued: int = 0) -> None:
        """``count`` prompts of ``user`` ended, ``queued`` of them before their first token."""
        with self._lock:
            _drop(self.per_user, user, count)
            _drop(self.queued, user, queued)
            self.total = max(0, self.total - count)


def _drop(table: dict[str, int], user: str, count: int) -> None:
    left = table.get(user, 0) - count
    if left > 0:
        table[user] = left
    else:
        table.pop(user, None)
