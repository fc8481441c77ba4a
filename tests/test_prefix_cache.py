"""Automatic prefix caching: reuse of cached full blocks, exact outputs, safe eviction."""

from __future__ import annotations

import random

from pagedq import LLM, SamplingParams

from .conftest import run_checked

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompt(tok, seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [tok.bos_token_id] + [rng.randrange(10, 2000) for _ in range(n - 1)]


def test_second_request_prefills_only_new_tokens(tiny_llama):
    bs = 8
    with LLM(tiny_llama, dtype="float32", block_size=bs) as llm:
        tok = llm.get_tokenizer()
        prefix = _prompt(tok, 1, 3 * bs)
        first = [*prefix, 42, 43, 44]
        second = [*prefix, 7, 8, 9, 10, 11]
        run_checked(llm, [first], GREEDY)
        before = llm.stats()
        out = run_checked(llm, [second], GREEDY)[0]
        after = llm.stats()
    # only the 5 new prompt tokens are prefilled; then one forward token per generated token but the last
    computed = after["computed_tokens"] - before["computed_tokens"]
    assert computed == 5 + GREEDY.max_tokens - 1
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * bs
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == len(second)
    with LLM(tiny_llama, dtype="float32", block_size=bs, enable_prefix_caching=False) as plain:
        ref = run_checked(plain, [second], GREEDY)[0]
        assert plain.stats()["prefix_cache_hits"] == 0
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_whole_prompt_cached_still_computes_last_token(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        p = _prompt(llm.get_tokenizer(), 2, 16)  # exactly 4 full blocks
        a = run_checked(llm, [p], GREEDY)[0].outputs[0].token_ids
        before = llm.stats()
        b = run_checked(llm, [p], GREEDY)[0].outputs[0].token_ids
        after = llm.stats()
    assert a == b
    assert (
        after["prefix_cache_hits"] - before["prefix_cache_hits"] == 12
    )  # 3 blocks: the 4th holds the last token


def test_eviction_under_a_small_pool_never_returns_a_wrong_block(tiny_llama):
    """Many prompts with overlapping prefixes through a pool far too small to keep them all."""
    bs = 4
    with LLM(tiny_llama, dtype="float32", block_size=bs, enable_prefix_caching=False) as plain:
        tok = plain.get_tokenizer()
        heads = [_prompt(tok, s, 12) for s in range(4)]
        rng = random.Random(0)
        prompts = [
            heads[rng.randrange(4)] + _prompt(tok, 100 + i, 1 + rng.randrange(9))[1:] for i in range(24)
        ]
        refs = [o.outputs[0].token_ids for o in run_checked(plain, prompts, GREEDY)]
    with LLM(tiny_llama, dtype="float32", block_size=bs, num_kv_blocks=24, max_num_seqs=3) as llm:
        outs = []
        for i in range(0, len(prompts), 3):  # waves, so that later waves find (or miss) earlier blocks
            outs += [o.outputs[0].token_ids for o in run_checked(llm, prompts[i : i + 3], GREEDY)]
        s = llm.stats()
    assert outs == refs
    assert s["prefix_cache_evictions"] > 0
    assert s["prefix_cache_hits"] > 0


def test_chunked_prefill_and_preemption_with_cache(tiny_llama):
    bs = 4
    with LLM(tiny_llama, dtype="float32", block_size=bs, enable_prefix_caching=False) as plain:
        tok = plain.get_tokenizer()
        shared = _prompt(tok, 5, 20)
        prompts = [shared + _prompt(tok, 200 + i, 6)[1:] for i in range(6)]
        refs = [o.outputs[0].token_ids for o in run_checked(plain, prompts, GREEDY)]
    with LLM(tiny_llama, dtype="float32", block_size=bs, num_kv_blocks=20, max_num_batched_tokens=10) as llm:
        outs = [o.outputs[0].token_ids for o in run_checked(llm, prompts, GREEDY)]
        s = llm.stats()
    assert outs == refs
    assert s["prefix_cache_hits"] > 0
    assert s["num_preemptions"] > 0


def test_reset_prefix_cache_forgets_cached_blocks_only_when_nothing_runs(tiny_llama):
    """A second run of the same prompts hits the cache; after a reset it does not (benchmarks
    reset between runs). While a request holds blocks the reset refuses and changes nothing."""
    from pagedq import LLM, SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(1, 50))}
    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        hits = llm.stats()["prefix_cache_hits"]
        llm.generate([prompt], sp, use_tqdm=False)
        assert llm.stats()["prefix_cache_hits"] > hits
        assert llm.stats()["prefix_cached_blocks"] > 0
        assert llm.reset_prefix_cache()
        assert llm.stats()["prefix_cached_blocks"] == 0
        hits = llm.stats()["prefix_cache_hits"]
        again = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
        assert llm.stats()["prefix_cache_hits"] == hits
        assert again == first
        engine = llm.engine
        engine.add_request(prompt, sp)
        engine.step()
        cached = engine.block_manager.num_cached_blocks
        assert not llm.reset_prefix_cache()
        assert engine.block_manager.num_cached_blocks == cached
        engine.block_manager.check()
