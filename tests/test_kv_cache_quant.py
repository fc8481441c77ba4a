"""Quantized KV cache (int8 with per-token scales, fp8 e4m3): accuracy, memory, block copies."""

from __future__ import annotations

import pytest
import torch
from pagedq.kernels import AttentionMetadata, paged_attention_decode, reshape_and_cache

from pagedq import LLM, SamplingParams

LONG = (
    "def main(argv):\n    x = parse(argv)\n    for a in x:\n        print(a, file=sys.stderr)\n    return 0\n"
)

# Tolerances (stated in the README): relative error of decode attention outputs against a
# float32 cache, and absolute error of log-probabilities read through the quantized cache.
ATTN_RTOL = {"int8": 0.02, "fp8_e4m3": 0.08}
LOGPROB_ATOL = {"int8": 0.01, "fp8_e4m3": 0.05}
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.uint8}


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_decode_attention_over_a_quantized_cache(kind):
    g = torch.Generator().manual_seed(0)
    nb, bs, kvh, hd, nh, b = 12, 4, 2, 16, 4, 3
    lens = [9, 16, 5]
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]])
    caches = {}
    for name, dtype in (("ref", torch.float32), (kind, STORAGE[kind])):
        k, v = torch.zeros(nb, bs, kvh, hd, dtype=dtype), torch.zeros(nb, bs, kvh, hd, dtype=dtype)
        ks = vs = None
        if dtype == torch.int8:
            ks, vs = (
                torch.zeros(nb, bs, kvh, dtype=torch.float16),
                torch.zeros(nb, bs, kvh, dtype=torch.float16),
            )
        caches[name] = (k, v, ks, vs)
    for i, n in enumerate(lens):
        keys = torch.randn(n, kvh, hd, generator=g)
        vals = torch.randn(n, kvh, hd, generator=g)
        slots = torch.tensor([tables[i, p // bs] * bs + p % bs for p in range(n)])
        for k, v, ks, vs in caches.values():
            reshape_and_cache(keys, vals, k, v, slots, ks, vs)
    q = torch.randn(b, nh, hd, generator=g)
    lens_t = torch.tensor(lens)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long),
        num_decode_tokens=b,
        decode_block_ids=tables.view(-1),
        decode_max_blocks=4,
        decode_mask=(torch.arange(16)[None, :] < lens_t[:, None]).view(b, 1, 1, 16),
        decode_context_lens=lens_t,
    )
    ref = paged_attention_decode(q, *caches["ref"][:2], meta, hd**-0.5)
    k, v, ks, vs = caches[kind]
    out = paged_attention_decode(q, k, v, meta, hd**-0.5, ks, vs)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < ATTN_RTOL[kind], err


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_logprobs_through_a_quantized_cache_stay_close(tiny_llama, kind):
    """Chunked prefill (8 tokens a step) makes every chunk read the earlier ones from the cache."""
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    lps = {}
    for kv in ("auto", kind):
        with LLM(tiny_llama, dtype="float32", kv_cache_dtype=kv, max_num_batched_tokens=8) as llm:
            out = llm.generate([LONG], sp, use_tqdm=False)[0]
            lps[kv] = [max(v.logprob for v in p.values()) for p in out.prompt_logprobs[1:]]
    assert len(lps[kind]) > 20
    diff = max(abs(a - b) for a, b in zip(lps["auto"], lps[kind]))
    assert 0 < diff < LOGPROB_ATOL[kind], diff


def test_quantized_cache_holds_twice_the_blocks(tiny_llama):
    blocks = {}
    for kv in ("auto", "int8", "fp8_e4m3"):
        with LLM(tiny_llama, dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory="3MiB") as llm:
            blocks[kv] = llm.stats()["num_kv_blocks"]
            cfg = llm.engine.model_config
    assert blocks["fp8_e4m3"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1)
    # int8 adds one float16 scale per token and KV head: head_dim + 2 bytes instead of 2 * head_dim
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 2)
    assert blocks["int8"] == 3 * 2**20 // (per_token * 16)
    assert blocks["int8"] > 1.75 * blocks["auto"]


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_copy_on_write_carries_the_scales(tiny_llama, kind):
    """n=3 greedy samples forked from one prefill equal a single greedy run on the same cache."""
    with LLM(tiny_llama, dtype="float32", kv_cache_dtype=kind, block_size=4) as llm:
        single = llm.generate(
            [LONG], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )
        forked = llm.generate(
            [LONG], SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )
        assert llm.engine.block_manager.num_cow_copies > 0
    assert [c.token_ids for c in forked[0].outputs] == [single[0].outputs[0].token_ids] * 3


def test_bad_kv_cache_dtype_names_the_choices(tiny_llama):
    with pytest.raises(
        ValueError, match=r"kv_cache_dtype must be 'auto' .*, 'int8' or 'fp8_e4m3', got 'int4'"
    ):
        LLM(tiny_llama, kv_cache_dtype="int4")
