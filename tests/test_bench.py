"""The benchmark commands run end to end on a tiny model (numbers are printed, never asserted)."""

from __future__ import annotations

import argparse

import pytest

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


def test_the_roofline_counts_flops_and_bytes_of_prefill_and_each_decode_step():
    """One layer, hidden 4, intermediate 8, 2 heads of 2 over 1 KV head, vocab 10; one request
    of 3 prompt and 3 output tokens; a machine of 1000 FLOP/s and 1000 B/s (float32)."""
    import torch

    from pagedq.bench import roofline
    from pagedq.bench.workloads import Workload
    from pagedq.models.config import ModelConfig

    cfg = ModelConfig("LlamaForCausalLM", 4, 8, 1, 2, 1, 2, 10, 1e-5, 64, True, 1e4)
    assert roofline.linear_params(cfg) == 4 * 8 + 4 * 4 + 3 * 4 * 8  # qkv, o, gate/up/down
    w = Workload("t", [[1, 2, 3]], [3])
    floor = roofline.workload_floor(cfg, w, roofline.Machine(1000.0, 1000.0, torch.float32))
    # prefill: 2*144*3 linear + 16 FLOPs per visible key * 6 keys + the first token's LM head
    assert floor.prefill_flops == 864 + 96 + 80
    # decode steps 1 and 2 at contexts 4 and 5: FLOPs 432, 448; bytes 184*4 weights + 16 per token
    assert floor.decode_flops == 432 + 448
    assert floor.decode_bytes == (736 + 64) + (736 + 80)
    assert floor.seconds == pytest.approx(1.040 + 0.800 + 0.816)  # each decode step memory-bound
    assert floor.output_tps == pytest.approx(3 / 2.656)
    assert "reaches 50% of the floor" in roofline.describe(
        roofline.Machine(1000.0, 1000.0, torch.float32), floor, floor.output_tps / 2
    )


def test_the_machine_is_measured_where_the_benchmark_runs():
    import torch

    from pagedq.bench import roofline

    m = roofline.measure_machine(torch.float32, repeats=1)
    assert m.gemm_flops > 1e8
    assert m.read_bytes > 1e8
