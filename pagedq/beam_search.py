"""Beam search in the core: parameters, and the per-request selection of the next beams.

A beam-search request keeps ``beam_width`` live beams, each an ordinary :class:`Sequence` with
its own block table, so beams are scheduled, batched with other requests and preempted like any
sequence. When every live beam has its next-token log-probabilities (usually all in the same
step), :meth:`BeamSearch.select` picks the next beams; the engine then forks a parent that
continues more than once (the children share its blocks; only the diverging partial block is
copied on write) and frees at once the blocks of the beams nobody continues.

The selection follows Hugging Face transformers' ``generate(num_beams=k, do_sample=False)``
step for step, so that results are equal to it:

* candidates are the top ``max(2, 1 + #stop ids) * k`` continuations of all live beams by
  cumulative log-probability (float32, as transformers computes it);
* a candidate that ends in a stop token, or reaches ``max_tokens``, is a finished hypothesis if
  it ranks among the first ``k`` candidates; its score is its cumulative log-probability divided
  by ``num_generated_tokens ** length_penalty``; the ``k`` best hypotheses are kept;
* the next live beams are the ``k`` best candidates that did not finish;
* the search ends when no live beam can beat the worst kept hypothesis any more (the heuristic
  of ``early_stopping=False``, or with ``"never"`` the bound at ``max_tokens``), when ``k``
  hypotheses are kept and ``early_stopping=True``, or when every candidate finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import Range, check_bool, check_token_ids
from .sequence import Sequence

# transformers marks impossible scores with -1e9 rather than -inf; the same constant keeps the
# comparisons identical
_NEG = -1.0e9


@dataclass
class BeamSearchParams:
    """Parameters of one beam-search request (the names of vLLM's ``BeamSearchParams``).

    ``length_penalty`` is the exponent of the length in the score of a finished hypothesis
    (``> 0`` favours longer ones). ``early_stopping`` is ``True`` (stop once ``beam_width``
    hypotheses finished), ``False`` (stop when no live beam can still beat them, judged at the
    current length) or ``"never"`` (judged at the best length possible).
    """

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    # Read by the parts of the engine that handle every kind of request.
    logprobs = None
    prompt_logprobs = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n(self) -> int:
        return self.beam_width

    def validate(self) -> None:
        """Check every field's type and range (``ValueError``); ``stop_token_ids`` becomes a list."""
        Range(int, ge=1).check("beam_width", self.beam_width)
        Range(int, ge=1).check("max_tokens", self.max_tokens)
        Range(float).check("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check_bool("ignore_eos", self.ignore_eos)
        check_bool("skip_special_tokens", self.skip_special_tokens)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        self.stop_token_ids = check_token_ids("stop_token_ids", ids)

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids has token ids outside the vocabulary (size {vocab_size}): {bad}"
            )
        if self.beam_width > vocab_size:
            raise ValueError(f"beam_width must be <= the vocabulary size {vocab_size}, got {self.beam_width}")


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens and its length-penalized score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (a stop token) or "length"
    stop_reason: int | None = None


class BeamSearch:
    """The beam state of one request: live beams, their scores, the kept hypotheses."""

    def __init__(
        self, params: BeamSearchParams, stop_ids: list[int], user_stop_ids: list[int], max_new_tokens: int
    ):
        self.params = params
        self.width = params.beam_width
        self.stop_ids = set(stop_ids)
        self.user_stop_ids = set(user_stop_ids)
        self.max_new_tokens = max_new_tokens
        self.num_candidates = max(2, 1 + len(self.stop_ids)) * self.width
        self.live: list[Sequence] = []
        self.scores: list[float] = []  # cumulative log-probability of each live beam (float32 values)
        self.rows: dict[int, torch.Tensor] = {}  # seq_id -> log-softmax of its next-token logits
        self.finished: list[Hypothesis] = []  # best first, at most ``width``
        self.improvable = True
        self.done = False
        self.num_generated = 0
        self._next_index = 1

    def next_index(self) -> int:
        i, self._next_index = self._next_index, self._next_index + 1
        return i

    def ready(self) -> bool:
        """Whether every live beam has its next-token log-probabilities."""
        return all(s.seq_id in self.rows for s in self.live)

    def select(self) -> list[tuple[Sequence, int, float]]:
        """Pick the next live beams: ``(parent, token, cumulative logprob)``, best first.

        Updates the kept hypotheses and ``done``; returns ``[]`` when the search is over.
        """
        k, lp = self.width, self.params.length_penalty
        rows = torch.stack([self.rows.pop(s.seq_id) for s in self.live])
        self.rows.clear()
        vocab = rows.shape[1]
        scores = torch.tensor(self.scores, dtype=torch.float32, device=rows.device)
        flat = (rows + scores[:, None]).view(-1)
        vals, idx = torch.topk(flat, min(self.num_candidates, flat.numel()))
        length = self.num_generated + 1  # tokens a candidate has generated
        at_max = length >= self.max_new_tokens
        tokens = (idx % vocab).tolist()
        parents = (idx // vocab).tolist()
        hits = [at_max or t in self.stop_ids for t in tokens]

        # Finished candidates among the first k become hypotheses, unless the search is closed.
        closed = not self.improvable or (self.params.early_stopping is True and len(self.finished) == k)
        if not closed and any(hits[:k]):
            normed = (vals / (length**lp)).tolist()
            merged = list(self.finished)
            for j in range(min(k, len(tokens))):
                if hits[j]:
                    parent, t = self.live[parents[j]], tokens[j]
                    stop = t in self.stop_ids
                    merged.append(
                        Hypothesis(
                            parent.output_token_ids + [t],
                            float(vals[j]),
                            normed[j],
                            "stop" if stop else "length",
                            t if stop and t in self.user_stop_ids else None,
                        )
                    )
            merged.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
            self.finished = merged[:k]

        values = vals.tolist()
        picks = [(self.live[parents[j]], tokens[j], values[j]) for j in range(len(tokens)) if not hits[j]][:k]
        self.num_generated = length
        if not picks:
            self.done = True
            return []
        # Can a live beam still beat the worst kept hypothesis?
        if self.params.early_stopping == "never" and lp > 0.0:
            best_len = self.max_new_tokens
        else:
            best_len = length
        best = float(torch.tensor(picks[0][2], dtype=torch.float32) / (best_len**lp))
        worst = min(h.score for h in self.finished) if len(self.finished) == k else _NEG
        self.improvable = self.improvable and best > worst
        if not self.improvable or (self.params.early_stopping is True and len(self.finished) == k):
            self.done = True
            return []
        return picks
