"""From sampled token ids to what callers see: log-probabilities, text, stop strings, outputs.

After :meth:`Scheduler.update_from_output` has appended a step's tokens (and finished the
sequences that hit a stop token or a length limit), the output processor turns each new token
into its log-probability entries and its text (incremental detokenization), ends sequences
whose text now contains a stop string (cutting the text there), and assembles a
:class:`RequestOutput` per request. The latency histograms are fed here too, since "a token was
produced" is decided here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from . import detokenizer
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampler import LogprobRow, Sampler
from .sequence import Request, Sequence


class OutputProcessor:
    def __init__(self, tokenizer, finish: Callable[[Sequence], None], latency: dict):
        self.tokenizer = tokenizer
        self.decode = detokenizer.decoder(tokenizer)
        self.finish = finish  # end a sequence and free its blocks (the scheduler's)
        self.latency = latency

    # --- tokens --------------------------------------------------------------------------------

    def process_token(self, seq: Sequence, lp) -> None:
        """The newest token of ``seq`` (already appended): its log-probabilities, its text, and a
        stop string it completes. A stop string ends the sequence with ``"stop"`` even when the
        token also reached ``max_tokens``, as vLLM does."""
        token = seq.token_ids[-1]
        if lp is not None and seq.logprobs is not None:
            seq.logprobs.append(self.logprob_dict(token, lp))
            seq.cumulative_logprob += lp[0]
        delta = detokenizer.detokenize_step(self.decode, seq)
        p = seq.params
        if not (p.stop_strings and delta) or seq.finish_reason not in (None, "length"):
            return
        if seq.num_output_tokens < p.min_tokens:
            return
        reason, stop = _check_stop_strings(seq, len(delta))
        if reason is not None:
            if not seq.is_finished:
                self.finish(seq)
            seq.finish_reason, seq.stop_reason = reason, stop

    def record_prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[Request, int]]) -> None:
        """Logits of prompt positions -> each request's ``prompt_logprobs`` (and, for
        ``LLM.next_token_logprobs``, the whole distributions)."""
        keep = [i for i, (req, _) in enumerate(targets) if req.prompt_distributions is not None]
        if keep:
            dists = torch.log_softmax(logits[keep].float(), dim=-1).cpu()
            for j, i in enumerate(keep):
                cast(list, targets[i][0].prompt_distributions).append(dists[j : j + 1])
        ids = torch.tensor([t for _, t in targets], device=logits.device)
        want = [req.params.prompt_logprobs for req, _ in targets]
        rows = Sampler.token_logprobs(logits, ids, want)
        for (req, token), row in zip(targets, rows):
            if req.prompt_logprobs is not None and row is not None:
                req.prompt_logprobs.append(self.logprob_dict(token, row))

    def logprob_dict(self, token: int, row: LogprobRow) -> dict[int, Logprob]:
        lp, rank, top = row
        d = {t: Logprob(v, r + 1, self.tokenizer.decode([t])) for r, (t, v) in enumerate(top)}
        if token not in d:
            d[token] = Logprob(lp, rank, self.tokenizer.decode([token]))
        return d

    # --- outputs -------------------------------------------------------------------------------

    def output(self, req: Request) -> RequestOutput:
        if req.beam is not None:
            return req.beam.output(req, self.tokenizer)
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.output_text,
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        return req.output(outs)

    def observe_latency(self, req: Request, out: RequestOutput, now: float) -> None:
        produced = max((len(c.token_ids) for c in out.outputs), default=0)
        if req.first_token_time is None and produced:
            req.first_token_time = now
            self.latency["time_to_first_token_seconds"].observe(now - req.arrival_time)
        if req.finished:
            if produced > 1 and req.first_token_time is not None:
                self.latency["time_per_output_token_seconds"].observe(
                    (now - req.first_token_time) / (produced - 1)
                )
            self.latency["e2e_request_latency_seconds"].observe(now - req.arrival_time)


def _check_stop_strings(seq: Sequence, new_chars: int) -> tuple[str | None, str | None]:
    """Find a stop string that the newest text completes; cut the text there."""
    p = seq.params
    text = seq.output_text
    best = None
    for stop in p.stop_strings:
        # only a match that ends inside the new text is new
        idx = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None, None
    idx, stop = best
    seq.output_text = text[: idx + len(stop)] if p.include_stop_str_in_output else text[:idx]
    return "stop", stop
