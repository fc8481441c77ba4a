"""A step that raises fails only the requests responsible: they end with ``finish_reason="error"``
and a message, their blocks are freed, and every other request produces exactly the tokens it
produces alone. Faults are injected where a kernel bug or a bad request would surface: the model
step, the sampler, and a request's own token handling."""

from __future__ import annotations

import pytest

from pagedq import LLM, GenerationError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
PROMPTS = {"a": [1, 20, 30, 40], "b": [1, 21, 31, 41, 51, 61], "c": [1, 22, 32]}
POISON = 777  # a token id the injected model fault trips on


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, dtype="float32", block_size=4, enable_prefix_caching=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(llm):
    """What each request produces on its own (no fault anywhere)."""
    return {
        rid: llm.generate({"prompt_token_ids": p}, SEEDED if rid == "c" else GREEDY, use_tqdm=False)[0]
        .outputs[0]
        .token_ids
        for rid, p in PROMPTS.items()
    }


def drive(engine, submit_at: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict:
    """Step the engine to the end, queueing ``submit_at[i]`` before step ``i``; check the block
    manager after every step; return the final outputs by request id."""
    finals, step = {}, 0
    while True:
        for rid, prompt, sp in submit_at.get(step, []):
            engine.add_request({"prompt_token_ids": prompt}, sp, request_id=rid)
        if not engine.has_unfinished_requests() and step > max(submit_at):
            break
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.block_manager.check()
        step += 1
    assert engine.block_manager.num_used_blocks == 0
    return finals


def others_unchanged(finals: dict, alone: dict) -> None:
    for rid, tokens in alone.items():
        assert finals[rid].error is None
        assert finals[rid].outputs[0].finish_reason == "length"
        assert finals[rid].outputs[0].token_ids == tokens, rid


@pytest.fixture
def faulty_model(llm, monkeypatch):
    """The model raises whenever the poison token is among its input ids (a kernel that
    crashes on one request's data)."""
    model = llm.engine.runner.model
    forward = model.forward

    def poisoned(ids, *args, **kwargs):
        if (ids == POISON).any():
            raise RuntimeError("injected kernel fault")
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", poisoned)


def normal(at: int = 0) -> dict:
    return {at: [(rid, p, SEEDED if rid == "c" else GREEDY) for rid, p in PROMPTS.items()]}


def test_a_request_that_breaks_the_model_step_fails_alone(llm, alone, faulty_model):
    # admitted together with the others, and later, while the others are decoding
    for when in (0, 3):
        submit = normal()
        submit.setdefault(when, []).append(("bad", [1, 5, POISON, 9], GREEDY))
        finals = drive(llm.engine, submit)
        bad = finals["bad"]
        assert bad.outputs[0].finish_reason == "error"
        assert bad.outputs[0].token_ids == []
        assert "injected kernel fault" in bad.error
        others_unchanged(finals, alone)
    # the engine keeps serving
    assert (
        llm.generate({"prompt_token_ids": PROMPTS["a"]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        == alone["a"]
    )


def test_a_running_request_that_breaks_its_decode_fails_alone(llm, alone, monkeypatch):
    """The culprit is not a newly admitted request: the retry without the new ones fails too,
    and every request is tried alone."""
    runner = llm.engine.runner
    execute = runner.execute

    def faulty(step, rows):
        if any(it.seq.request.request_id == "bad" and it.seq.num_output_tokens >= 3 for it in step.scheduled):
            raise RuntimeError("injected decode fault")
        return execute(step, rows)

    monkeypatch.setattr(runner, "execute", faulty)
    submit = normal()
    submit[0].append(("bad", [1, 6, 8], GREEDY))
    submit[5] = [("late", PROMPTS["a"], GREEDY)]  # admitted in a failing step: a suspect, innocent
    finals = drive(llm.engine, submit)
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert len(finals["bad"].outputs[0].token_ids) == 3  # what it produced before, marked failed
    assert "injected decode fault" in finals["bad"].error
    others_unchanged(finals, alone)
    assert finals["late"].outputs[0].token_ids == alone["a"]


def test_a_sampler_fault_fails_only_its_row_and_seeded_rows_keep_their_draws(llm, alone, monkeypatch):
    sampler = llm.engine.sampler
    call = type(sampler).__call__

    def faulty(self, logits, seqs):
        if any(s.request.request_id == "bad" for s in seqs):
            raise RuntimeError("injected sampler fault")
        return call(self, logits, seqs)

    monkeypatch.setattr(type(sampler), "__call__", faulty)
    submit = normal()
    submit[0].append(("bad", [1, 6, 8, 10], SEEDED))
    finals = drive(llm.engine, submit)
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert "sampler fault" in finals["bad"].error
    others_unchanged(finals, alone)  # "c" is seeded: its generator was put back before the retry


def test_a_fault_in_token_handling_fails_only_that_request(llm, alone, monkeypatch):
    engine = llm.engine
    process = engine.processor.process_token

    def faulty(seq, lp):  # called with the new token appended: the third one
        if seq.request.request_id == "bad" and seq.num_output_tokens == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return process(seq, lp)

    monkeypatch.setattr(engine.processor, "process_token", faulty)
    submit = normal()
    submit[1] = [("bad", [1, 6, 8, 10], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12))]
    finals = drive(engine, submit)
    assert [c.finish_reason for c in finals["bad"].outputs] == ["error", "error"]
    assert "detokenizer fault" in finals["bad"].error
    others_unchanged(finals, alone)


def test_the_python_api_raises_instead_of_returning_cut_off_text(llm, alone, faulty_model):
    with pytest.raises(GenerationError, match=r"1 of 2 requests failed.*injected kernel fault") as e:
        llm.generate(
            [{"prompt_token_ids": PROMPTS["a"]}, {"prompt_token_ids": [1, POISON]}], GREEDY, use_tqdm=False
        )
    ok, bad = e.value.outputs
    assert ok.outputs[0].token_ids == alone["a"]
    assert bad.outputs[0].finish_reason == "error"
    with pytest.raises(GenerationError, match="injected kernel fault"):
        list(llm.stream({"prompt_token_ids": [1, POISON]}, GREEDY))
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


def test_a_fault_everywhere_fails_everyone_explicitly(llm, monkeypatch):
    runner = llm.engine.runner

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(runner, "execute", broken)
    finals = drive(llm.engine, normal())
    assert all(o.outputs[0].finish_reason == "error" and "out of memory" in o.error for o in finals.values())
    assert set(finals) == set(PROMPTS)
