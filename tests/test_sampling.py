"""The sampler: seeds, top-k/p, min-p, penalties, bias, stops and log-probabilities."""

from __future__ import annotations

import pytest
import torch

from pagedq import LLM, SamplingParams

from .conftest import PROMPTS, run_checked


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=8) as llm:
        yield llm


def _tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in run_checked(llm, prompts, params)]


def test_seeded_sampling_is_batch_independent(llm):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = _tokens(llm, [PROMPTS[0]], sp)[0]
    others = [SamplingParams(temperature=0.8, max_tokens=n, seed=None, ignore_eos=True) for n in (5, 30, 12)]
    mixed = _tokens(
        llm, [PROMPTS[3], PROMPTS[0], PROMPTS[4], PROMPTS[1]], [others[0], sp, others[1], others[2]]
    )
    assert mixed[1] == alone
    # and a different seed gives different tokens (the seed is really used)
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99, ignore_eos=True)
    assert _tokens(llm, [PROMPTS[0]], other_seed)[0] != alone


def test_unseeded_sampling_varies(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a, b = _tokens(llm, [PROMPTS[2], PROMPTS[2]], sp)
    assert a != b


@pytest.mark.parametrize(
    "kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=1, temperature=5.0)], ids=str
)
def test_degenerate_filters_equal_greedy(llm, kw):
    greedy = _tokens(llm, PROMPTS[:4], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    params = {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True, "seed": 7, **kw}
    assert _tokens(llm, PROMPTS[:4], SamplingParams(**params)) == greedy


def test_repetition_penalty_matches_transformers(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    tok = llm.get_tokenizer()
    sp = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5, ignore_eos=True)
    ours = _tokens(llm, PROMPTS[:3], sp)
    for p, o in zip(PROMPTS[:3], ours):
        ids = tok(p, return_tensors="pt").input_ids
        ref = hf.generate(ids, do_sample=False, max_new_tokens=16, repetition_penalty=1.5, pad_token_id=0)
        assert o == ref[0, ids.shape[1] :].tolist()


def test_presence_and_frequency_penalties_reduce_repeats(llm):
    base = _tokens(llm, [PROMPTS[6]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    pen = SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0
    )
    penalized = _tokens(llm, [PROMPTS[6]], pen)[0]
    assert len(set(penalized)) > len(set(base))


def test_logit_bias_forces_a_token(llm):
    sp = SamplingParams(temperature=0, max_tokens=6, logit_bias={123: 100.0}, ignore_eos=True)
    assert _tokens(llm, PROMPTS[:2], sp) == [[123] * 6, [123] * 6]


def test_stop_token_ids_and_min_tokens(llm):
    greedy = _tokens(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_tok = greedy[4]
    first = greedy.index(stop_tok)
    out = run_checked(
        llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok])
    )[0]
    c = out.outputs[0]
    assert c.token_ids == greedy[: first + 1]
    assert c.finish_reason == "stop"
    assert c.stop_reason == stop_tok
    # min_tokens keeps the stop token from being sampled before it is reached
    sp = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok], min_tokens=first + 2)
    c = run_checked(llm, [PROMPTS[0]], sp)[0].outputs[0]
    assert len(c.token_ids) >= first + 2
    assert stop_tok not in c.token_ids[: first + 2]


def test_stop_string_cuts_text(llm):
    full = run_checked(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = text[10:14]
    assert stop
    assert text.find(stop) >= 1
    out = run_checked(llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[
        0
    ].outputs[0]
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert len(out.token_ids) < 30
    kept = SamplingParams(temperature=0, max_tokens=30, stop=stop, include_stop_str_in_output=True)
    out = run_checked(llm, [PROMPTS[1]], kept)[0].outputs[0]
    assert out.text == text[: text.find(stop) + len(stop)]


def test_max_tokens_finish_reason_length(llm):
    out = run_checked(llm, [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].finish_reason == "length"


def test_logprobs_match_transformers(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    out = run_checked(llm, [PROMPTS[4]], sp)[0]
    c = out.outputs[0]
    full = torch.tensor([out.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
    n_prompt = len(out.prompt_token_ids)
    assert len(c.logprobs) == 8
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[n_prompt - 1 + i]
        top = row.topk(5)
        assert list(lp)[:5] == top.indices.tolist()
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert lp[t].logprob == pytest.approx(v, abs=1e-4)
        assert lp[tok].rank == 1  # greedy picks the top token
    assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)))
    # prompt logprobs: None for the first token, then the actual token plus the top 3
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == n_prompt
    for p in range(1, n_prompt):
        actual = out.prompt_token_ids[p]
        entry = out.prompt_logprobs[p]
        assert entry[actual].logprob == pytest.approx(ref[p - 1, actual].item(), abs=1e-4)
        assert entry[actual].rank == int((ref[p - 1] > ref[p - 1, actual]).sum()) + 1


def test_prompt_logprobs_with_chunked_prefill(tiny_llama):
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    with LLM(tiny_llama, dtype="float32") as whole:
        ref = run_checked(whole, [PROMPTS[8]], sp)[0].prompt_logprobs
    with LLM(tiny_llama, dtype="float32", max_num_batched_tokens=5) as chunked:
        got = run_checked(chunked, [PROMPTS[8]], sp)[0].prompt_logprobs
    assert len(got) == len(ref)
    for a, b in zip(got[1:], ref[1:]):
        assert list(a) == list(b)
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_greedy_steps_take_the_argmax_of_the_logits_as_they_are(tiny_llama, monkeypatch, dtype):
    """All-greedy steps with no bias, ban, penalty or logprobs skip the float32 copy of the
    logits (a bf16 model's argmax reads them as they are): the same tokens as the general path,
    in a batch that mixes plain greedy rows with a biased, a penalized and a logprob row (which
    take the general path for the whole step) and alone."""
    from pagedq.sampler import Sampler

    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    params = [
        plain,
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={5: 100.0}),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1),
        plain,
    ]
    import pagedq.sampler as sampler_module

    seen = []  # the dtype each argmax call got
    argmax = sampler_module.argmax
    monkeypatch.setattr(sampler_module, "argmax", lambda x: (seen.append(x.dtype), argmax(x))[1])
    with LLM(tiny_llama, dtype=dtype) as llm:

        def run(prompts, sp):  # each run computes its prompts (bf16: a cached prefix rounds differently)
            llm.reset_prefix_cache()
            return _tokens(llm, prompts, sp)

        fast_alone = run(PROMPTS[:2], plain)
        assert set(seen) == {getattr(torch, dtype)}  # the logits as the model returned them
        mixed = run(PROMPTS[:5], params)
        monkeypatch.setattr(Sampler, "_adjusts", lambda self, s: True)  # every step the general path
        slow_alone = run(PROMPTS[:2], plain)
        slow_mixed = run(PROMPTS[:5], params)
    assert fast_alone == slow_alone
    assert mixed == slow_mixed
    assert mixed[0] == fast_alone[0]
    assert mixed[1] != fast_alone[1]  # the bias took effect
    assert all(t == 5 for t in mixed[1])
