"""Greedy output of pagedq equals transformers' generate() token for token, in float32."""

from __future__ import annotations

import pytest

from pagedq import LLM, SamplingParams

from .conftest import ARCHS, PROMPTS, hf_greedy, run_checked

MAX_NEW = 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _ours(model_dir, **kw):
    with LLM(model_dir, dtype="float32", **kw) as llm:
        outs = run_checked(llm, PROMPTS, GREEDY)
        stats = llm.stats()
    return [o.outputs[0].token_ids for o in outs], stats


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(model_factory, arch):
    d = model_factory(arch)
    ours, stats = _ours(d, block_size=16)
    assert ours == hf_greedy(d, PROMPTS, MAX_NEW)
    assert stats["kv_blocks_in_use"] == 0
    assert stats["generated_tokens"] == MAX_NEW * len(PROMPTS)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_transformers(model_factory, rope):
    d = model_factory("llama", rope_scaling=rope)
    assert _ours(d)[0] == hf_greedy(d, PROMPTS, MAX_NEW)


def test_block_size_one(model_factory):
    d = model_factory("llama")
    assert _ours(d, block_size=1)[0] == hf_greedy(d, PROMPTS, MAX_NEW)


def test_preemption_keeps_results(model_factory):
    d = model_factory("qwen2")
    # 12 blocks of 4 tokens cannot hold nine sequences of up to ~45 tokens: the scheduler must preempt
    ours, stats = _ours(d, block_size=4, num_kv_blocks=14)
    assert stats["num_preemptions"] > 0
    assert ours == hf_greedy(d, PROMPTS, MAX_NEW)


def test_chunked_prefill(model_factory):
    d = model_factory("qwen3")
    # a budget of 8 tokens per step splits every longer prompt into chunks that share steps with decodes
    ours, stats = _ours(d, block_size=4, max_num_batched_tokens=8)
    assert stats["num_steps"] > MAX_NEW + 5
    assert ours == hf_greedy(d, PROMPTS, MAX_NEW)


def test_sharded_checkpoint(tmp_path, tokenizer):
    from pagedq.models.build import build_model

    d = build_model("tiny", str(tmp_path / "sharded"), tokenizer=tokenizer)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    model.save_pretrained(d, max_shard_size="300KB")
    import os

    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    assert _ours(d)[0] == hf_greedy(d, PROMPTS, MAX_NEW)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {"num_key_value_heads": 1}),  # MQA
        ("llama", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 32}),  # head_dim from the config, not hidden / heads
        ("mistral", {"num_key_value_heads": 4}),  # plain multi-head attention
    ],
    ids=["mqa", "tied", "head_dim", "mha"],
)
def test_model_variants_match_transformers(model_factory, arch, overrides):
    d = model_factory(arch, **overrides)
    assert _ours(d)[0] == hf_greedy(d, PROMPTS, MAX_NEW)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": 8}),  # every layer windowed
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # layer 1 only
    ],
    ids=["mistral-window", "qwen2-window-layers"],
)
def test_sliding_window_matches_transformers(model_factory, arch, overrides, monkeypatch):
    """Windows far shorter than the prompts and outputs; decode, fresh and chunked prefill."""
    d = model_factory(arch, **overrides)
    with LLM(d, dtype="float32") as llm:
        windows = [layer.self_attn.window for layer in llm.engine.runner.model.layers]
    assert windows == ([8, 8] if arch == "mistral" else [0, 8])
    ref = hf_greedy(d, PROMPTS, MAX_NEW)
    assert _ours(d, block_size=4)[0] == ref
    assert _ours(d, block_size=4, max_num_batched_tokens=8)[0] == ref  # chunks read the cache


def test_granite_multipliers_are_applied(model_factory):
    """Granite differs from Llama only in four scalars: with them at 1.0 it is Llama, and the
    tiny Granite of the other tests has Granite 3's values, which change what it generates."""
    from pagedq.models import ARCHITECTURES

    plain = model_factory("granite", embedding_multiplier=1.0, residual_multiplier=1.0,
                          attention_multiplier=0.25, logits_scaling=1.0)  # fmt: skip
    d = model_factory("granite")
    assert "GraniteForCausalLM" in ARCHITECTURES
    ours_plain, ours = _ours(plain)[0], _ours(d)[0]
    assert ours_plain == hf_greedy(plain, PROMPTS, MAX_NEW)
    assert ours == hf_greedy(d, PROMPTS, MAX_NEW)
    assert ours != ours_plain
