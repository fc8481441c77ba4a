"""``pagedq bench sharing``: KV sharing on and off, on the ``parallel``, ``beam`` and ``prefix`` workloads.

With sharing, a request with ``n=4`` prefills its prompt once and its samples share the prompt
blocks; beams share the blocks of their common history and copy only the block where they
diverge; requests reuse cached prefix blocks. Without it, the ``n`` samples are submitted as
separate requests, a forked beam gets a private copy of all its parent's blocks (what a
contiguous per-sequence cache does), and prefix caching is off. Both produce the same tokens
(sample ``j`` of a request seeded ``s`` draws from ``s + j``); the report is peak KV blocks in
use, the memory saved, and throughput (tokens generated per second; for beam search, the tokens
of every live beam).
"""

from __future__ import annotations

import statistics
import time

from pagedq.llm import LLM
from pagedq.sampling_params import BeamSearchParams, SamplingParams

from . import workloads


def _run(model_dir: str, args, shared: bool, prompts, params) -> dict:
    with LLM(
        model_dir,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=shared,
        enable_kv_sharing=shared,
        max_num_seqs=args.max_num_seqs,
    ) as llm:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        s = llm.stats()
    return {
        "seconds": dt,
        "tps": s["generated_tokens"] / dt,
        "peak": s["peak_kv_blocks_in_use"],
        "hits": s["prefix_cache_hits"],
        "outs": [c.token_ids for o in outs for c in o.outputs],
    }


def _parallel(tok, n):
    w = workloads.parallel(tok)
    shared = (
        [{"prompt_token_ids": p} for p in w.prompts],
        [
            SamplingParams(n=n, temperature=1.0, max_tokens=m, seed=i, ignore_eos=True)
            for i, m in enumerate(w.output_lens)
        ],
    )
    sep_prompts, sep_params = [], []
    for i, (p, m) in enumerate(zip(w.prompts, w.output_lens)):
        for j in range(n):
            sep_prompts.append({"prompt_token_ids": p})
            sep_params.append(SamplingParams(temperature=1.0, max_tokens=m, seed=i + j, ignore_eos=True))
    return shared, (sep_prompts, sep_params)


def _beam(tok, width):
    w = workloads.beam(tok)
    prompts = [{"prompt_token_ids": p} for p in w.prompts]
    params = [BeamSearchParams(beam_width=width, max_tokens=m) for m in w.output_lens]
    return (prompts, params), (prompts, params)


def _prefix(tok):
    w = workloads.prefix(tok)
    prompts = [{"prompt_token_ids": p} for p in w.prompts]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in w.output_lens]
    return (prompts, params), (prompts, params)


def main(args) -> None:
    from pagedq.models.build import MODEL_SHAPES, ensure_model

    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    with LLM(model_dir, num_kv_blocks=1) as probe:
        tok = probe.get_tokenizer()
    builders = {
        "parallel": lambda: _parallel(tok, 4),
        "beam": lambda: _beam(tok, 4),
        "prefix": lambda: _prefix(tok),
    }
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in builders]
    if unknown:
        raise SystemExit(f"unknown sharing workload(s) {unknown}; choose from {sorted(builders)}")
    cases = {name: builders[name]() for name in names}
    print(f"model {model_dir} ({args.dtype}), block size {args.block_size}, medians of {args.runs} runs")
    print(f"{'workload':<10}{'sharing':>9}{'peak blocks':>13}{'saved':>8}{'out tok/s':>11}{'speed-up':>10}")
    for name, (with_sharing, without) in cases.items():
        on, off = [], []
        for _ in range(args.runs):  # interleaved
            on.append(_run(model_dir, args, True, *with_sharing))
            off.append(_run(model_dir, args, False, *without))
        if on[-1]["outs"] != off[-1]["outs"]:
            # expected outside float32: the two runs batch different sequences together, and
            # reduced-precision GEMMs round differently for different batch shapes
            print(
                f"  note: {name}: tokens with and without sharing differ ({args.dtype} batch-shape rounding; "
                "they agree in float32)"
            )
        p_on, p_off = on[-1]["peak"], off[-1]["peak"]
        t_on = statistics.median(r["tps"] for r in on)
        t_off = statistics.median(r["tps"] for r in off)
        print(
            f"{name:<10}{'on':>9}{p_on:>13}{100 * (1 - p_on / p_off):>7.1f}%{t_on:>11.1f}{t_on / t_off:>9.2f}x"
        )
        print(f"{'':<10}{'off':>9}{p_off:>13}{'':>8}{t_off:>11.1f}")
