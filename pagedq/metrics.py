"""Engine counters and gauges in Prometheus' text format (what ``/metrics`` of the API serves).

Everything comes from :meth:`LLMEngine.stats` and, with fair sharing, the tokens served per user
(:meth:`LLMEngine.user_service`): KV pool use and waste, queue lengths, prefix-cache hits,
preemptions, tokens in and out. Names follow Prometheus' conventions (``pagedq_`` prefix,
``_total`` for counters, base units).
"""

from __future__ import annotations

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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(stats: dict, model: str, user_service: dict[str, float] | None = None) -> str:
    """``stats`` (from ``LLMEngine.stats()``) as Prometheus exposition text, labelled with ``model``."""
    lines = []
    labels = f'model="{_label(model)}"'
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
    if user_service:
        name = "pagedq_user_served_tokens"
        lines += [f"# HELP {name} tokens served per user (fair share, weighted)", f"# TYPE {name} gauge"]
        for user, tokens in sorted(user_service.items()):
            lines.append(f'{name}{{{labels},user="{_label(user)}"}} {float(tokens)!r}')
    return "\n".join(lines) + "\n"
