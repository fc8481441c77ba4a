"""Engine counters and gauges in Prometheus' text format (what ``/metrics`` of the API serves).

Everything comes from :meth:`LLMEngine.stats`, what each recently active user was really served
(:meth:`LLMEngine.user_stats`), and the engine's latency histograms (time to first token, time
per output token, request latency): KV pool use and waste, queue lengths, prefix-cache hits,
preemptions, tokens in and out. Names follow Prometheus' conventions (``pagedq_`` prefix,
``_total`` for counters, base units).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

GAUGES = {
    "num_kv_blocks": "KV blocks in the pool",
    "kv_blocks_in_use": "KV blocks held by sequences",
    "peak_kv_blocks_in_use": "most KV blocks held at once since start-up",
    "kv_waste": "share of allocated KV slots holding no token",
    "prefix_cached_blocks": "blocks kept by the prefix cache",
    "num_running": "sequences running",
    "num_waiting": "sequences waiting",
    "kv_cache_bytes": "bytes of the KV pool",
    "weight_bytes": "bytes of the model weights",
}
COUNTERS = {
    "num_requests": "requests received",
    "prompt_tokens": "prompt tokens received",
    "generated_tokens": "tokens generated",
    "computed_tokens": "tokens run through the model (prefill chunks and decodes)",
    "num_steps": "engine steps",
    "num_preemptions": "sequences preempted",
    "prefix_cache_queries": "prefix-cache lookups",
    "prefix_cache_hits": "prefix-cache blocks found",
    "prefix_cache_evictions": "prefix-cache blocks evicted",
}


@dataclass
class UserStats:
    """What one user was really served (fair share orders by its own virtual time). Defined here,
    not in the engine, so that a server unpickling it needs no torch."""

    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens received (once per sample)
    computed_tokens: int = 0  # prompt and output tokens run through the model (recomputation included)
    generated_tokens: int = 0  # output tokens produced
    last_active: float = 0.0  # time.monotonic() of the user's latest request or step


USER_COUNTERS = {  # per recently active user (idle users are dropped, their series with them)
    "requests": "requests received per user",
    "prompt_tokens": "prompt tokens received per user",
    "computed_tokens": "tokens run through the model per user (prompts, outputs, recomputation)",
    "generated_tokens": "output tokens generated per user",
}


@dataclass
class Histogram:
    """Observations counted into buckets by upper bound (Prometheus' histogram, not cumulative
    here: :func:`prometheus_text` accumulates)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # one per bucket, then one for +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


# seconds: from a fast CPU decode step to a long queue wait
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HISTOGRAMS = {
    "time_to_first_token_seconds": "from a request's arrival to its first generated token",
    "time_per_output_token_seconds": "mean time between a finished request's tokens after the first",
    "e2e_request_latency_seconds": "from a request's arrival to its end",
}


def latency_histograms() -> dict[str, Histogram]:
    return {name: Histogram(LATENCY_BUCKETS) for name in HISTOGRAMS}


def label_value(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(
    stats: dict,
    model: str,
    users: dict | None = None,
    histograms: dict[str, Histogram] | None = None,
) -> str:
    """``stats`` (from ``LLMEngine.stats()``), per-user counters (``LLMEngine.user_stats()``) and
    the latency histograms as Prometheus exposition text, labelled with ``model``."""
    lines = []
    labels = f'model="{label_value(model)}"'
    for kind, table, suffix in (("gauge", GAUGES, ""), ("counter", COUNTERS, "_total")):
        for key, help_text in table.items():
            if key not in stats:
                continue
            name = f"pagedq_{key}{suffix}"
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} {kind}",
                f"{name}{{{labels}}} {float(stats[key])!r}",
            ]
    for key, help_text in USER_COUNTERS.items():
        if not users:
            break
        name = f"pagedq_user_{key}_total"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for user, st in sorted(users.items()):
            lines.append(f'{name}{{{labels},user="{label_value(user)}"}} {float(getattr(st, key))!r}')
    for key, hist in (histograms or {}).items():
        name = f"pagedq_{key}"
        lines += [f"# HELP {name} {HISTOGRAMS.get(key, key)}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip([*hist.buckets, float("inf")], hist.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {float(total)!r}')
        lines += [
            f"{name}_sum{{{labels}}} {float(hist.sum)!r}",
            f"{name}_count{{{labels}}} {float(hist.count)!r}",
        ]
    return "\n".join(lines) + "\n"
