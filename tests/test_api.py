"""The public API: prompt forms, output order, streaming, chat, errors, stats and lifecycle."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pagedq import LLM, RequestOutput, SamplingParams

from .conftest import PROMPTS, run_checked


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=8, max_model_len=256) as llm:
        yield llm


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_prompt_forms_and_order(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    outs = llm.generate([PROMPTS[0], ids, {"prompt_token_ids": ids}, PROMPTS[1]], GREEDY, use_tqdm=False)
    assert [type(o) for o in outs] == [RequestOutput] * 4
    assert outs[0].prompt == PROMPTS[0]
    assert outs[0].prompt_token_ids == ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[3].prompt == PROMPTS[1]
    # a single prompt (string or token ids) is accepted as is
    assert len(llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)) == 1
    assert llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    # one SamplingParams per prompt
    per = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 2, 3)]
    assert [len(o.outputs[0].token_ids) for o in llm.generate(PROMPTS[:3], per, use_tqdm=False)] == [1, 2, 3]


def test_text_equals_decoded_tokens(llm):
    out = llm.generate(
        PROMPTS[:4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )
    tok = llm.get_tokenizer()
    for o in out:
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


def test_stream_yields_growing_text_and_abort_frees_blocks(llm):
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seen = [o.outputs[0].text for o in llm.stream(PROMPTS[0], sp)]
    final = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0].text
    assert seen[-1] == final
    assert len(seen) >= 5
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))
    it = llm.stream(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(it)
    next(it)
    assert eng.block_manager.num_used_blocks > 0
    it.close()  # the consumer stops early: its requests are aborted
    assert eng.block_manager.num_used_blocks == 0
    assert not eng.has_unfinished_requests()
    eng.block_manager.check()


def test_engine_abort(llm):
    eng = llm.engine
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=50))
    keep = eng.add_request(PROMPTS[1], GREEDY)
    eng.step()
    out = eng.abort(rid)
    assert out.outputs[0].finish_reason == "abort"
    assert out.finished
    done = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id == keep and o.finished:
                done = o
        eng.block_manager.check()
    assert done is not None
    assert len(done.outputs[0].token_ids) == 6
    assert eng.block_manager.num_used_blocks == 0


def test_chat_uses_template(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():"}]
    out = llm.chat(msgs, GREEDY, use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert (
        llm.get_tokenizer()
        .decode(out.prompt_token_ids, skip_special_tokens=False)
        .endswith("<|assistant|>\n")
    )
    assert "Be brief." in expected
    assert len(out.outputs[0].token_ids) == 6
    assert len(llm.chat([msgs, msgs[1:]], GREEDY, use_tqdm=False)) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_are_rejected_and_others_keep_running(llm):
    eng = llm.engine
    running = eng.add_request(PROMPTS[0], GREEDY)
    eng.step()
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(5, 300))], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 10**6]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["x"], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(PROMPTS[:3], [GREEDY, GREEDY], use_tqdm=False)
    # one bad prompt in a list queues none of them
    before = eng.stats()["num_requests"]
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["ok", ""], GREEDY, use_tqdm=False)
    assert eng.stats()["num_requests"] == before
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == [running]
    assert len(outs[0].outputs[0].token_ids) == 6


def test_bad_engine_config(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny_llama, block_size=0)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(tiny_llama, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="smaller than one KV block"):
        LLM(tiny_llama, kv_cache_memory=10)
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_llama, dtype="int3")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, max_model_len=10**6)
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture.*LlamaForCausalLM"):
        LLM(str(bad))
    os.remove(bad / "config.json")
    with pytest.raises(ValueError, match=r"config.json"):
        LLM(str(bad))


def test_request_larger_than_pool_is_rejected(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=4, num_kv_blocks=4) as small:
        with pytest.raises(ValueError, match="KV blocks"):
            small.generate(PROMPTS[0], SamplingParams(max_tokens=100), use_tqdm=False)
        assert small.generate("x", SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids


def test_kv_cache_memory_sizes_the_pool(tiny_llama):
    with LLM(tiny_llama, dtype="float32", kv_cache_memory="1MiB", block_size=16) as llm:
        # tiny: 2 layers x (K+V) x 2 kv heads x head_dim 16 x 4 bytes = 512 bytes/token
        assert llm.stats()["num_kv_blocks"] == 2**20 // (512 * 16)
    with LLM(tiny_llama, dtype="bfloat16", kv_cache_memory=2**20, block_size=16) as llm:
        assert llm.stats()["num_kv_blocks"] == 2 * 2**20 // (512 * 16)


def test_the_default_token_budget_is_2048_tokens_and_at_least_max_num_seqs(tiny_llama):
    """2048 tokens per step by default (CPUs too: full decode batches early); never below
    max_num_seqs; an explicit budget is kept."""
    with LLM(tiny_llama, dtype="float32") as llm:
        assert llm.engine.scheduler.max_num_batched_tokens == 2048
    with LLM(tiny_llama, dtype="float32", max_num_seqs=3000) as llm:
        assert llm.engine.scheduler.max_num_batched_tokens == 3000
    with LLM(tiny_llama, dtype="float32", max_num_batched_tokens=64) as llm:
        assert llm.engine.scheduler.max_num_batched_tokens == 64


def test_stats_and_kv_waste(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=16) as llm:
        run_checked(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        s = llm.stats()
    for key in (
        "num_kv_blocks",
        "kv_blocks_in_use",
        "peak_kv_blocks_in_use",
        "kv_waste",
        "peak_kv_waste",
        "num_preemptions",
        "prompt_tokens",
        "generated_tokens",
    ):
        assert key in s
    assert s["kv_blocks_in_use"] == 0
    assert s["kv_waste"] == 0.0
    assert s["generated_tokens"] == 20 * len(PROMPTS)
    assert s["num_preemptions"] == 0
    # at the peak every sequence wastes less than one block: waste < blocks held / (blocks held * 16) per seq
    assert 0.0 < s["peak_kv_waste"] < len(PROMPTS) / s["peak_kv_blocks_in_use"]


def test_close_frees_and_a_new_engine_starts(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32")
    first = llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.close()
    assert llm.engine.runner.model is None
    assert llm.engine.runner.kv_caches == []
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    with LLM(tiny_llama, dtype="float32") as again:
        assert again.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == first
