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
    assert "parallel" in out
    assert "beam" in out
    assert "prefix" in out
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


def test_bench_quant_prints_every_variant_and_the_crossover(tiny_llama, capsys):
    from pagedq.cli import main

    main(
        [
            "bench",
            "quant",
            "--model",
            tiny_llama,
            "--runs",
            "1",
            "--decode-tokens",
            "4",
            "--throughput",
            "--num-requests",
            "3",
            "--crossover",
        ]
    )
    out = capsys.readouterr().out
    rows: dict = {}
    for line in out.splitlines():  # the first table: name, MiB, tok/s, ratio, perplexity, KL, runs
        if line.split():
            rows.setdefault(line.split()[0], line.split())
    for name in ("bf16", "int8", "int4"):
        assert name in rows, out
    assert float(rows["bf16"][5]) == 0.0
    assert float(rows["int4"][5]) > 0.0
    assert out.count("crossover, gate_up_proj") == 2
    from pagedq.kernels import native

    if native.woq_supported():  # ours beside torch's kernel on the same weights
        assert "NativeQuantLinear" in out
        assert "Int8Linear" in out
        assert "Int4Linear" in out
