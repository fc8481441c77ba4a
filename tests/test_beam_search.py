"""Beam search in the core: equal to HF ``num_beams``, beams sharing blocks, pruned beams freed."""

from __future__ import annotations

import collections

import pytest
import torch

from pagedq import LLM, BeamSearchParams, SamplingParams

from .conftest import PROMPTS, run_checked

BEAM_PROMPTS = PROMPTS[:5]
SETTINGS = [(1.0, False), (0.0, True), (2.0, "never"), (-0.5, False)]  # (length_penalty, early_stopping)


class HFBeams:
    """Reference: transformers ``generate(num_beams=k, do_sample=False)``, one prompt at a time."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def __call__(self, prompt: str, k: int, max_new: int, lp: float, es, eos: list[int]):
        ids = self.tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            g = self.model.generate(
                ids,
                num_beams=k,
                num_return_sequences=k,
                do_sample=False,
                max_new_tokens=max_new,
                length_penalty=lp,
                early_stopping=es,
                eos_token_id=eos,
                pad_token_id=self.tok.pad_token_id,
                return_dict_in_generate=True,
                output_scores=True,
            )
        n = ids.shape[1]
        lens = (g.beam_indices != -1).sum(dim=1).tolist()
        return [(g.sequences[i, n : n + lens[i]].tolist(), float(g.sequences_scores[i])) for i in range(k)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_beam_search_equals_hf(model_factory, arch):
    model_dir = model_factory(arch)
    hf = HFBeams(model_dir)
    max_new = 20
    with LLM(model_dir, dtype="float32") as llm:
        eos = llm.engine.eos_token_ids
        # A random model rarely emits EOS; the token its beams emit most often is made a stop
        # token as well, so that beams finish early, hypotheses compete and the search stops
        # early — every branch of the selection runs.
        counts = collections.Counter()
        for p in BEAM_PROMPTS:
            for toks, _ in hf(p, 4, max_new, 1.0, False, eos):
                counts.update(toks)
        stop = counts.most_common(1)[0][0]
        finished_early = 0
        for k in (2, 4):
            for lp, es in SETTINGS:
                params = BeamSearchParams(
                    beam_width=k,
                    max_tokens=max_new,
                    length_penalty=lp,
                    early_stopping=es,
                    stop_token_ids=[stop],
                )
                outs = run_checked(llm, BEAM_PROMPTS, params)
                for p, out in zip(BEAM_PROMPTS, outs):
                    ref = hf(p, k, max_new, lp, es, [*eos, stop])
                    got = [(c.token_ids, c.score) for c in out.outputs]
                    assert [t for t, _ in got] == [t for t, _ in ref], (arch, k, lp, es, p)
                    for (_, s), (_, rs) in zip(got, ref):
                        assert s == pytest.approx(rs, rel=1e-4, abs=1e-4)
                    scores = [c.score for c in out.outputs]
                    assert scores == sorted(scores, reverse=True)
                    for c in out.outputs:
                        if len(c.token_ids) < max_new:
                            finished_early += 1
                            assert c.token_ids[-1] == stop
                            assert c.finish_reason == "stop"
                            assert c.stop_reason == stop
                        assert c.text == llm.get_tokenizer().decode(c.token_ids, skip_special_tokens=True)
        assert finished_early > 0


def _prompt(tok, n):
    return [tok.bos_token_id, *list(range(100, 100 + n - 1))]


def test_beams_share_blocks_and_copy_only_the_diverging_one(tiny_llama):
    bs, P = 16, 53  # 3 full prompt blocks + 5 tokens in the fourth
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32", block_size=bs) as llm:
        eng, bm = llm.engine, llm.engine.block_manager
        rid = eng.add_request(_prompt(llm.get_tokenizer(), P), params)
        eng.step()  # prefill; the first logits fork 4 beams from the prompt's beam
        bm.check()
        beams = eng.requests[rid].seqs
        assert len(beams) == 4
        assert len({b.seq_id for b in beams}) == 4
        assert bm.num_used_blocks == 4  # all four point at the prompt's 4 blocks
        assert [bm.ref_counts[b] for b in beams[0].block_table] == [4, 4, 4, 4]
        eng.step()  # each beam writes its token into the shared partial block: 3 copies on write
        bm.check()
        assert bm.num_cow_copies == 3
        # during that forward: 3 shared full blocks + 4 private partial ones (the search then
        # prunes the beams nobody continues, so fewer may be held now)
        assert eng.stats()["peak_kv_blocks_in_use"] == 3 + 4
        assert bm.num_used_blocks <= 3 + 4
        while eng.has_unfinished_requests():
            eng.step()
            bm.check()
        assert bm.num_free_blocks == eng.num_kv_blocks


def test_sharing_off_gives_the_same_beams_with_more_blocks(tiny_llama):
    params = BeamSearchParams(beam_width=4, max_tokens=24, ignore_eos=True)
    prompts = [PROMPTS[4], PROMPTS[8]]
    runs = {}
    for sharing in (True, False):
        with LLM(
            tiny_llama,
            dtype="float32",
            block_size=4,
            enable_kv_sharing=sharing,
            enable_prefix_caching=sharing,
        ) as llm:
            outs = run_checked(llm, prompts, params)
            runs[sharing] = ([[c.token_ids for c in o.outputs] for o in outs], llm.stats())
    assert runs[True][0] == runs[False][0]
    on, off = runs[True][1]["peak_kv_blocks_in_use"], runs[False][1]["peak_kv_blocks_in_use"]
    assert on < 0.6 * off, (on, off)


def test_beams_under_preemption_and_eviction_stay_exact(tiny_llama):
    """A small pool preempts beams mid-search and evicts cached blocks; results do not change."""
    params = BeamSearchParams(beam_width=4, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[4], PROMPTS[2], PROMPTS[5]]
    plist = [params, other, params, params]
    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        alone = run_checked(llm, prompts, plist)
    with LLM(tiny_llama, dtype="float32", block_size=4, num_kv_blocks=30) as llm:
        tight = run_checked(llm, prompts, plist)
        s = llm.stats()
        assert s["num_preemptions"] > 0
        assert s["prefix_cache_evictions"] > 0
    for a, b in zip(alone, tight):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_beam_and_sampling_requests_batch_together(tiny_llama):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    beam = BeamSearchParams(beam_width=2, max_tokens=16, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32") as llm:
        solo_g = llm.generate(PROMPTS[:2], greedy, use_tqdm=False)
        solo_b = llm.beam_search(PROMPTS[2:4], beam, use_tqdm=False)
        mixed = llm.generate(PROMPTS[:4], [greedy, greedy, beam, beam], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in solo_g]
    assert [[c.token_ids for c in o.outputs] for o in mixed[2:]] == [
        [c.token_ids for c in o.outputs] for o in solo_b
    ]
    # width 1 is greedy search
    with LLM(tiny_llama, dtype="float32") as llm:
        one = llm.beam_search(
            PROMPTS[:2], BeamSearchParams(beam_width=1, max_tokens=16, ignore_eos=True), use_tqdm=False
        )
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in solo_g]


def test_abort_and_stream_of_a_beam_request(tiny_llama):
    params = BeamSearchParams(beam_width=3, max_tokens=30, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32", block_size=4) as llm:
        eng = llm.engine
        rid = eng.add_request(PROMPTS[4], params)
        for _ in range(5):
            outs = eng.step()
        assert outs
        assert not outs[0].finished
        assert len(outs[0].outputs) == 3
        assert all(
            len(c.token_ids) == 5 for c in outs[0].outputs
        )  # a token per step, the first from the prefill
        final = eng.abort(rid)
        assert final.finished
        assert all(c.finish_reason == "abort" for c in final.outputs)
        assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
        streamed = list(
            llm.stream([PROMPTS[4]], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
        )
        assert streamed[-1].finished
        assert len(streamed[-1].outputs) == 3
        assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_bad_beam_params_are_rejected_with_the_fix(tiny_llama):
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1"):
        BeamSearchParams(beam_width=0)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        BeamSearchParams(beam_width=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="length_penalty must be a finite number"):
        BeamSearchParams(beam_width=2, length_penalty=float("nan"))
    with LLM(tiny_llama, dtype="float32", max_num_seqs=4, num_kv_blocks=20, block_size=4) as llm:
        with pytest.raises(ValueError, match="beam_width=8 exceeds max_num_seqs=4"):
            llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=8))
        with pytest.raises(ValueError, match=r"4 beams of up to .* but the whole pool has 20"):
            llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=4, max_tokens=60))
        with pytest.raises(ValueError, match="stop_token_ids has token ids outside the vocabulary"):
            llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, stop_token_ids=[10**6]))
        with pytest.raises(ValueError, match="beam_search needs a BeamSearchParams"):
            llm.beam_search(PROMPTS[0], SamplingParams())
        # the engine is untouched and still serves
        assert llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=2, max_tokens=4), use_tqdm=False)[
            0
        ].finished


def test_cli_generate_with_beams(tiny_llama, capsys):
    from pagedq import cli

    cli.main(
        [
            "generate",
            "--model",
            tiny_llama,
            "--dtype",
            "float32",
            "x = 1",
            "--beam-width",
            "3",
            "--max-tokens",
            "6",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    with LLM(tiny_llama, dtype="float32") as llm:
        ref = llm.beam_search("x = 1", BeamSearchParams(beam_width=3, max_tokens=6), use_tqdm=False)[0]
    assert lines == [f"[0.{c.index}] x = 1{c.text}" for c in ref.outputs]
