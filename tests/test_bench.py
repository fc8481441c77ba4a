"""The benchmark commands run end to end on a tiny model (numbers are printed, never asserted)."""

from __future__ import annotations

import argparse

from pagedq.bench import sharing


def test_bench_sharing_runs_and_sharing_keeps_tokens(tiny_llama, capsys):
    args = argparse.Namespace(
        model=tiny_llama,
        dtype="float32",
        block_size=16,
        kv_cache_memory=None,
        runs=1,
        max_num_seqs=256,
        cases="parallel,beam,prefix",
    )
    sharing.main(args)
    out = capsys.readouterr().out
    assert "parallel" in out and "beam" in out and "prefix" in out
    # in float32, sharing (fork + COW, prefix cache) gives exactly the tokens of unshared runs
    assert "differ" not in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("parallel", "beam", "prefix"))
    }
    for name in ("parallel", "beam", "prefix"):
        saved = float(rows[name][3].rstrip("%"))
        assert saved > 30.0, f"{name}: sharing saved only {saved}% of peak KV blocks"
