"""Property-based checks (hypothesis) of everything the Python API takes from outside: any value
of any field either validates or raises ``ValueError`` — never ``TypeError``, ``OverflowError``
or an error from deep inside the tokenizer or the model step."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pagedq import LLM, BeamSearchParams, SamplingParams  # noqa: E402

# any text, lone surrogates included (JSON can carry them: "\ud800")
TEXT = st.text(alphabet=st.characters(codec=None, categories=None), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(SCALARS, inner, max_size=3)),
    max_leaves=8,
)
FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
BEAM_FIELDS = [f.name for f in dataclasses.fields(BeamSearchParams) if f.init]
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5))
def test_sampling_params_validate_or_raise_value_error(kwargs):
    try:
        sp = SamplingParams(**kwargs)
    except ValueError:
        return
    sp.validate()  # what validated stays valid
    with contextlib.suppress(ValueError):
        sp.check_vocab(4096)


@PROPERTY
@given(st.dictionaries(st.sampled_from(BEAM_FIELDS), VALUES, max_size=4), st.integers(1, 5))
def test_beam_search_params_validate_or_raise_value_error(kwargs, width):
    kwargs.setdefault("beam_width", width)
    with contextlib.suppress(ValueError):
        BeamSearchParams(**kwargs)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with LLM(tiny_llama, dtype="float32", max_model_len=64, block_size=4, max_num_seqs=8) as llm:
        yield llm.engine


PROMPTS = st.one_of(
    VALUES,
    TEXT,
    st.lists(st.integers(-5, 5000), max_size=70),
    st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "other"]), VALUES, max_size=2),
)


@PROPERTY
@given(
    prompt=PROMPTS,
    kwargs=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3),
    extra=VALUES,
    user=st.one_of(st.none(), VALUES),
)
def test_requests_validate_or_raise_value_error(engine, prompt, kwargs, extra, user):
    """Prompts, params, request ids and users of any type: queued or refused with ValueError;
    whatever was queued runs to the end without an error."""
    try:
        params = SamplingParams(**kwargs)
    except ValueError:
        params = extra  # anything else in the params slot must be refused too
    try:
        rid = engine.add_request(prompt, params, user=user)
    except ValueError:
        assert not engine.has_unfinished_requests()
        return
    assert rid in engine.requests
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None
    assert engine.block_manager.num_used_blocks == 0
