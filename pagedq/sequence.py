"""Request and sequence state: the CPU-side bookkeeping of one generation.

A *request* is what a user submitted (one prompt, one ``SamplingParams``); it owns ``n``
*sequences*, each of which grows its own tokens and holds its own block table. The scheduler
and the block manager work on sequences; outputs are assembled per request.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    """One generated sequence.

    ``num_computed_tokens`` counts the tokens whose K/V sit in the cache; the tokens from there
    to ``len(token_ids)`` are what the next forward must process (the whole prompt at first, one
    token per step while decoding, everything again after a preemption).
    """

    def __init__(self, request: Request, index: int, token_ids: list[int] | None = None):
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.token_ids: list[int] = list(request.prompt_token_ids if token_ids is None else token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # prefix cache: leading blocks registered so far, and the content id of the last one
        self.num_cached_blocks = 0
        self.cache_parent_cid = -1
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # Output text and incremental-detokenizer offsets (see detokenizer.py).
        self.output_text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.tokens: list[str] | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None

    @property
    def params(self) -> SamplingParams:
        """The request's sampling parameters (a beam's request holds a BeamSearchParams, read by
        its search; the few fields other code reads of it exist on both)."""
        return cast(SamplingParams, self.request.params)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table}, status={self.status.value})"
        )


@dataclass
class Request:
    """A submitted prompt with its sampling parameters and its ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | BeamSearchParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Logits of the prompt positions come from the first forward pass(es); with chunked
    # prefill they arrive in pieces, so the count of positions already scored is kept.
    num_prompt_logprobs_done: int = 0
    # When a list: the full next-token log-softmax of every scored prompt position is kept
    # here too (``LLM.next_token_logprobs``, quantization studies), in chunks as they arrive.
    prompt_distributions: list | None = None
    # Beam-search state (a ``beam_search.BeamSearch``, which sits above this module: typed Any);
    # ``seqs`` are then the live beams.
    beam: Any = None
    # who asked: the unit of fair sharing (``scheduling_policy="fair"``)
    user: str = "default"
    # wall-clock marks for the latency metrics (time.perf_counter())
    arrival_time: float = 0.0
    first_token_time: float | None = None
    # why the engine failed this request (finish_reason "error" on its sequences)
    error: str | None = None

    def output(self, completions: list[CompletionOutput]) -> RequestOutput:
        """What the caller sees of this request now, with ``completions`` as its outputs."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=completions,
            finished=self.finished,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            error=self.error,
        )

    @property
    def finished(self) -> bool:
        if self.beam is not None and self.beam.done:
            return True
        return all(s.is_finished for s in self.seqs)
