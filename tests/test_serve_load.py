"""``pagedq bench serve-load``: streaming clients of several users against a real ``pagedq serve``,
a quarter hanging up mid-stream, malformed requests mixed in, the engine killed mid-round. Every
request sent is accounted for (completed, client-aborted, rejected, failed by the kill), nothing
hangs, and the KV pool and the admission counters are empty after each round. The default suite
runs a short version; the full one (48 clients, 60 s, 5 rounds) is marked ``load`` (``make test-all``)."""

from __future__ import annotations

import argparse

import pytest

from pagedq.bench import serve_load


def args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve_load.add_arguments(p)
    ns = p.parse_args([])
    ns.model, ns.dtype = "pagedq-tiny", "float32"
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def check(rounds) -> None:
    for r in rounds:
        c = r.counts
        assert r.balanced, (c, r.notes[:5])
        assert c["hung"] == 0, (c, r.notes[:5])
        assert c["other"] == 0, (c, r.notes[:5])
        for outcome in ("completed", "client_aborted", "rejected", "failed_by_kill"):
            assert c[outcome] > 0, c
        assert r.kv_blocks_in_use == 0
        assert r.prompts_in_flight == 0


@pytest.mark.slow  # starts pagedq serve
def test_short_load_with_hangups_malformed_requests_and_an_engine_kill():
    check(serve_load.run(args(clients=12, seconds=6.0, rounds=2, malformed_per_second=2.0)))


@pytest.mark.load  # about six minutes: `make test-all`, or `pagedq bench serve-load`
def test_full_load_48_clients_3_users_60s_5_rounds():
    rounds = serve_load.run(args())
    check(rounds)
    first = rounds[0].server_rss_mib
    assert all(r.server_rss_mib - first < 64 for r in rounds[1:]), [r.server_rss_mib for r in rounds]
