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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .outputs import CompletionOutput, RequestOutput
from .sampling_params import BeamSearchParams
from .sequence import Request, Sequence

# transformers marks impossible scores with -1e9 rather than -inf; the same constant keeps the
# comparisons identical
_NEG = -1.0e9


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens and its length-penalized score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop" (a stop token) or "length"
    stop_reason: int | None = None


class BeamSearch:
    """The beam state of one request: live beams, their scores, the kept hypotheses.

    The engine talks to it through four calls: :meth:`start` (the first beam of a new request),
    :meth:`collect` (a beam's next-token log-probabilities, as a step produces them), and once
    every live beam has its row, :meth:`advance` (fork, extend and prune the beams, through the
    scheduler's ``fork`` and ``finish``); :meth:`output` builds what the caller sees.
    """

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

    @classmethod
    def start(cls, req: Request, eos_token_ids: list[int], max_model_len: int) -> Sequence:
        """Attach a search to the beam-search request ``req``; return its first beam, which
        prefills the prompt (the search forks it when its first logits arrive)."""
        params = req.params
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"beam search needs a BeamSearchParams, got {type(params).__name__}")
        stop_ids = ([] if params.ignore_eos else list(eos_token_ids)) + params.stop_token_ids
        max_new = min(params.max_tokens, max_model_len - len(req.prompt_token_ids))
        search = req.beam = cls(params, stop_ids, params.stop_token_ids, max_new)
        first = Sequence(req, 0)
        req.seqs.append(first)
        search.live, search.scores = [first], [0.0]
        return first

    def collect(self, seq: Sequence, row: torch.Tensor) -> None:
        """Keep live beam ``seq``'s next-token log-probabilities (a log-softmax row)."""
        self.rows[seq.seq_id] = row

    def advance(
        self,
        req: Request,
        fork: Callable[[Sequence, Sequence], None],
        finish: Callable[[Sequence], None],
    ) -> int:
        """Advance the search by one token once :meth:`ready`: a parent continued more than once
        is forked first (``fork(parent, child)``: the child shares its blocks), beams nobody
        continues are ended at once (``finish``), and each new beam gets its token. Returns the
        number of tokens appended."""
        picks = self.select()
        continuing: set[int] = set()
        new_live: list[tuple[Sequence, int, float]] = []
        for parent, token, score in picks:
            if parent.seq_id in continuing:  # a second child: fork before the parent grows
                child = Sequence(req, self.next_index(), parent.token_ids)
                fork(parent, child)
            else:
                continuing.add(parent.seq_id)
                child = parent
            new_live.append((child, token, score))
        for beam in self.live:
            if beam.seq_id not in continuing:  # pruned, or the search is over: free at once
                finish(beam)
        for seq, token, score in new_live:
            seq.token_ids.append(token)
            seq.cumulative_logprob = score
        self.live = [seq for seq, _, _ in new_live]
        self.scores = [score for _, _, score in new_live]
        req.seqs = list(self.live)
        return len(new_live)

    def output(self, req: Request, tokenizer) -> RequestOutput:
        """The kept hypotheses, best first, once the search is over; the live beams before."""
        skip = self.params.skip_special_tokens
        if self.done and req.error is None:
            outs = [
                CompletionOutput(
                    index=i,
                    text=tokenizer.decode(h.token_ids, skip_special_tokens=skip),
                    token_ids=list(h.token_ids),
                    cumulative_logprob=h.cumulative_logprob,
                    finish_reason=h.finish_reason,
                    stop_reason=h.stop_reason,
                    score=h.score,
                )
                for i, h in enumerate(self.finished)
            ]
        else:
            outs = [
                CompletionOutput(
                    index=i,
                    text=tokenizer.decode(s.output_token_ids, skip_special_tokens=skip),
                    token_ids=list(s.output_token_ids),
                    cumulative_logprob=s.cumulative_logprob,
                    finish_reason=s.finish_reason,
                )
                for i, s in enumerate(req.seqs)
            ]
        return req.output(outs)

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
                            [*parent.output_token_ids, t],
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
        best_len = self.max_new_tokens if self.params.early_stopping == "never" and lp > 0.0 else length
        best = float(torch.tensor(picks[0][2], dtype=torch.float32) / (best_len**lp))
        worst = min(h.score for h in self.finished) if len(self.finished) == k else _NEG
        self.improvable = self.improvable and best > worst
        if not self.improvable or (self.params.early_stopping is True and len(self.finished) == k):
            self.done = True
            return []
        return picks
