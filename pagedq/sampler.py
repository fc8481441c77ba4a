"""Batched sampling: one tensor pass over the logits of every sequence that samples this step.

Order of operations (the one vLLM and transformers use): logit bias and min-token masking,
penalties, temperature, top-k / top-p / min-p, then the draw. Greedy rows take the argmax.

Seeded requests draw from their own ``torch.Generator``; their noise does not depend on the
other rows of the batch, so a seeded request gives the same tokens alone or in any batch. The
draw is an exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``), which equals sampling from
``p`` and lets every row use its own noise source.

Returned log-probabilities are those of the model's raw distribution (before penalties and
temperature), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedq.kernels import native

from .sequence import Sequence

# one row's logprobs: (logprob of the chosen token, its rank, [(token, logprob)] of the top k)
LogprobRow = tuple[float, int, list[tuple[int, float]]]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token's logprob, its rank, [(token, logprob) of the top-k]) or None
    logprobs: list[LogprobRow | None]


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits[:, : self.vocab_size]
        if all(s.params.greedy and s.params.logprobs is None and not self._adjusts(s) for s in seqs):
            # plain greedy rows: the argmax of the logits as they are (widening bf16 is exact and
            # keeps the order), without a float32 copy of the [rows, vocab] block
            return SamplerOutput(argmax(logits).tolist(), [None] * len(seqs))
        logits = logits.float()
        raw = logits
        logits = self._apply_bias_and_min_tokens(logits, seqs)
        logits = self._apply_penalties(logits, seqs)

        greedy = [s.params.greedy for s in seqs]
        token_ids = argmax(logits) if all(greedy) else self._sample(logits, seqs, greedy)

        want = [s.params.logprobs for s in seqs]
        logprob_rows: list[LogprobRow | None] = [None] * len(seqs)
        if any(k is not None for k in want):
            logprob_rows = self.token_logprobs(raw, token_ids, want)
        return SamplerOutput(token_ids.tolist(), logprob_rows)

    # --- steps -----------------------------------------------------------------------------

    def _adjusts(self, s: Sequence) -> bool:
        """Whether a logit bias, a min_tokens ban or a penalty changes ``s``'s logits this step."""
        p = s.params
        return bool(
            p.logit_bias
            or (s.num_output_tokens < p.min_tokens)
            or p.repetition_penalty != 1.0
            or p.presence_penalty
            or p.frequency_penalty
        )

    def _apply_bias_and_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        cloned = False
        for i, s in enumerate(seqs):
            p = s.params
            if p.logit_bias:
                if not cloned:
                    logits, cloned = logits.clone(), True
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                vals = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[i].index_add_(0, ids, vals)
            if s.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or ()) + ([] if p.ignore_eos else self.eos_token_ids)
                if banned:
                    if not cloned:
                        logits, cloned = logits.clone(), True
                    logits[i, banned] = float("-inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [
            i
            for i, s in enumerate(seqs)
            if s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        ]
        if not rows:
            return logits
        logits = logits.clone()
        dev = logits.device
        for i in rows:  # only penalized rows; each needs its own token history anyway
            p = seqs[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long, device=dev)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                out = seqs[i].output_token_ids
                if out:
                    counts = torch.bincount(torch.tensor(out, device=dev), minlength=self.vocab_size)[
                        : self.vocab_size
                    ].to(row.dtype)
                    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([1.0 if g else s.params.temperature for s, g in zip(seqs, greedy)], device=dev)
        greedy_ids = argmax(logits)
        logits = logits / temps[:, None]
        logits = _top_k_top_p_min_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.params.seed is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=dev)
            noise[idx] = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_(
                generator=self.generator
            )
        for i, s in enumerate(seqs):
            if s.params.seed is not None:
                noise[i].exponential_(generator=s.generator)
        sampled = argmax(probs / noise)
        greedy_mask = torch.tensor(greedy, device=dev)
        return torch.where(greedy_mask, greedy_ids, sampled)

    @staticmethod
    def token_logprobs(
        raw_logits: torch.Tensor, token_ids: torch.Tensor, want: list[int | None]
    ) -> list[LogprobRow | None]:
        """For each row: the logprob and rank of ``token_ids[row]`` and the top-``want[row]`` tokens."""
        logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
        chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
        kmax = max((k for k in want if k), default=0)
        top_vals, top_ids = logprobs.topk(kmax, dim=-1) if kmax else (logprobs[:, :0], logprobs[:, :0])
        rows: list[LogprobRow | None] = []
        chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
        for i, k in enumerate(want):
            if k is None:
                rows.append(None)
                continue
            top = list(zip(top_ids[i, :k].tolist(), top_vals[i, :k].tolist())) if k else []
            rows.append((chosen_l[i], ranks_l[i], top))
        return rows


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: the native kernel on CPUs (torch's is a scalar reduction, ~1.8 ms for a
    decode step's [64, 49152] logits on 2 cores), torch elsewhere; the same ids either way."""
    return native.argmax_rows(x) if native.argmax_supports(x) else x.argmax(dim=-1)


def _top_k_top_p_min_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask tokens outside each row's top-k, nucleus (top-p) and min-p sets with -inf."""
    vocab = logits.shape[-1]
    ks = [s.params.top_k if s.params.top_k > 0 else vocab for s in seqs]
    ps = [s.params.top_p for s in seqs]
    mps = [s.params.min_p for s in seqs]
    dev = logits.device
    if any(k < vocab for k in ks) or any(p < 1.0 for p in ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k_t = torch.tensor([min(k, vocab) for k in ks], device=dev)
        ranks = torch.arange(vocab, device=dev)[None, :]
        remove = ranks >= k_t[:, None]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        p_t = torch.tensor(ps, device=dev)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token if the mass before it is below top_p (the top token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        remove = remove | (mass_before >= p_t[:, None])
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(m > 0 for m in mps):
        probs = torch.softmax(logits, dim=-1)
        m_t = torch.tensor(mps, device=dev)
        threshold = probs.max(dim=-1, keepdim=True).values * m_t[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits
