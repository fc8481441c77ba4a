"""Parallel sampling (n > 1): one prefill, shared blocks, copy on write of the partial block."""

from __future__ import annotations

from pagedq import LLM, SamplingParams

from .conftest import run_checked


def _prompt(tok, n):
    return [tok.bos_token_id, *list(range(100, 100 + n - 1))]


def test_n4_shares_the_prompt_blocks(tiny_llama):
    bs, P, M = 16, 40, 20
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=M, seed=5, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32", block_size=bs) as llm:
        out = run_checked(llm, [_prompt(llm.get_tokenizer(), P)], sp)[0]
        shared = llm.stats()
        cow = llm.engine.block_manager.num_cow_copies
    # KV computed per sample at its last step: P + M - 2 tokens = 58 -> 4 blocks; the 2 full
    # prompt blocks are shared, the partial third is copied on write by 3 of the 4 samples
    assert shared["peak_kv_blocks_in_use"] == 2 + 4 * 2
    assert cow == 3
    assert shared["computed_tokens"] == P + 4 * (M - 1)  # the prompt is prefilled once
    assert len(out.outputs) == 4
    assert all(len(c.token_ids) == M for c in out.outputs)
    with LLM(tiny_llama, dtype="float32", block_size=bs, enable_prefix_caching=False) as plain:
        singles = [
            SamplingParams(temperature=1.0, max_tokens=M, seed=5 + i, ignore_eos=True) for i in range(4)
        ]
        sep = run_checked(plain, [_prompt(plain.get_tokenizer(), P)] * 4, singles)
        assert plain.stats()["peak_kv_blocks_in_use"] == 4 * 4
    # sample i of a seeded request is reproducible: it equals a single request with seed + i
    assert [c.token_ids for c in out.outputs] == [o.outputs[0].token_ids for o in sep]


def test_copy_on_write_keeps_every_sample_exact(tiny_llama):
    """Greedy samples after a fork equal an unforked greedy run (COW left every KV intact)."""
    for bs, P in ((4, 10), (16, 33), (1, 7)):
        with LLM(tiny_llama, dtype="float32", block_size=bs) as llm:
            p = _prompt(llm.get_tokenizer(), P)
            single = run_checked(llm, [p], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0]
        with LLM(tiny_llama, dtype="float32", block_size=bs) as llm:
            forked = run_checked(
                llm, [p], SamplingParams(n=3, temperature=0, max_tokens=15, ignore_eos=True)
            )[0]
        assert [c.token_ids for c in forked.outputs] == [single.outputs[0].token_ids] * 3


def test_n_samples_mixed_with_other_requests_and_preemption(tiny_llama):
    sp = SamplingParams(n=3, temperature=0.9, max_tokens=12, seed=11, ignore_eos=True)
    other = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        tok = llm.get_tokenizer()
        alone = run_checked(llm, [_prompt(tok, 21)], sp)[0]
    with LLM(tiny_llama, dtype="float32", block_size=4, num_kv_blocks=22) as llm:
        outs = run_checked(llm, [_prompt(tok, 30), _prompt(tok, 21), _prompt(tok, 26)], [other, sp, other])
        assert llm.stats()["num_preemptions"] > 0
    assert [c.token_ids for c in outs[1].outputs] == [c.token_ids for c in alone.outputs]


def test_abort_before_fork_frees_everything(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=4, max_num_batched_tokens=4) as llm:
        eng = llm.engine
        rid = eng.add_request(_prompt(llm.get_tokenizer(), 30), SamplingParams(n=4, max_tokens=5))
        eng.step()
        out = eng.abort(rid)
        assert [c.finish_reason for c in out.outputs] == ["abort"] * 4
        assert eng.block_manager.num_used_blocks == 0
        eng.block_manager.check()
