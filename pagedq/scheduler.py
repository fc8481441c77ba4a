"""Iteration-level (continuous) batching.

Every step the scheduler decides which sequences run and how many of their tokens, under a
token budget (``max_num_batched_tokens``), a sequence cap (``max_num_seqs``) and the free
blocks of the KV pool:

1. Running sequences first, in priority order: each gets its remaining tokens (1 while
   decoding, the rest of its prompt while a long prefill is under way), cut to the budget —
   that is chunked prefill. If the pool cannot hold them, the lowest-priority running sequence
   not yet scheduled this step is preempted: its blocks are freed and it goes back to the
   front of the waiting queue, to be recomputed from its tokens later (it keeps its output).
2. Then waiting sequences, in priority order, while the budget, the cap and the pool allow.
   A sequence starts from the longest cached chain of full blocks that prefixes its prompt
   (prefix caching) and only the rest is computed. Nothing new is admitted in a step that had
   to preempt.

The order is the policy's (:mod:`pagedq.policies`): first come first served, or per-user fair
share (``scheduling_policy="fair"``) for one engine shared by many users.

A beam-search request advances all its beams together: a beam whose next-token logits are in
sits in the running set without being scheduled until its sibling beams have theirs.

The scheduler only does CPU bookkeeping; the model runner turns its output
(:class:`SchedulerOutput`, the step's contract) into tensors. A step's life is
``schedule()`` → the model runs → the engine samples → :meth:`Scheduler.update_from_output`.
``schedule()`` already counts the scheduled tokens as computed (``num_computed_tokens``), as
vLLM v1 does, so that forks made while sampling start from the step's end; ``update_from_output``
makes the step final: full blocks enter the prefix cache, sampled tokens are appended, and
sequences that hit a stop token or a length limit finish and free their blocks. (A step that
fails is never committed for the requests it fails: they end with an error and their blocks
are freed before anything is cached.)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .policies import SchedulingPolicy
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: what the model runner reads (and all it reads).

    The runner computes ``token_ids`` — the sequence's tokens at ``positions`` — writes their
    K/V into the slots of ``block_table`` and, if ``samples``, returns the logits of the last
    one. ``seq`` is the scheduler's own handle (for :meth:`Scheduler.update_from_output`).
    """

    seq: Sequence
    num_new_tokens: int
    # taken from the waiting queue in this step (a new request, or one resuming after a
    # preemption): the first suspects when the step fails (see LLMEngine.step)
    admitted: bool = False
    start: int = field(init=False)  # tokens already in the cache: the first position computed now

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_new_tokens]

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_new_tokens)

    @property
    def block_table(self) -> list[int]:
        """The sequence's block ids, covering every position of this step (valid for the step)."""
        return self.seq.block_table

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence's tokens, so a token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step, as the scheduler hands it to the model runner.

    ``scheduled`` is in packed order: one-token decodes first, then prefill chunks (the order
    of the rows in the model's batch); ``block_copies`` are the copy-on-write block copies
    ``(src, dst)`` to do before the forward pass; ``preempted`` lists the sequences that lost
    their blocks in this step (they are back in the waiting queue).
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def subset(self, keep: list[ScheduledSeq]) -> SchedulerOutput:
        """The same step over some of its sequences (the block copies are all kept): how the
        engine retries a step that failed without the requests that made it fail."""
        return SchedulerOutput(keep, self.block_copies, self.preempted)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy | None = None,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        max_model_len: int | None = None,
    ):
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy or SchedulingPolicy()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of those, to give a user its share of a full batch

    def add(self, seq: Sequence) -> None:
        if self.policy.dynamic:  # only fair share needs who else has work (a scan of the queues)
            self.policy.activate(seq.request.user, self.active_users())
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.policy.key)

    def active_users(self) -> set[str]:
        return {s.request.user for s in self.waiting} | {s.request.user for s in self.running}

    def add_running(self, seq: Sequence) -> None:
        """Add a sequence that already holds its computed blocks (a fork) to the running set."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        self.running.sort(key=self.policy.key)
        if self.policy.dynamic:
            self.waiting.sort(key=self.policy.key)
        if self.waiting and len(self.running) >= self.max_num_seqs:
            # the batch is full: the policy may give a slot of an over-served user to the head of
            # the queue (before anything is scheduled, so no scheduled sequence is taken back)
            victim = self.policy.victim_for(self.waiting[0], self.running, self.max_num_seqs)
            if victim is not None:
                self._preempt(victim)
                self.num_fair_preemptions += 1

        # 1. Running sequences: decodes and unfinished (chunked) prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:  # a beam whose logits are in, waiting for its sibling beams
                i += 1
                continue
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]  # lowest priority among those not scheduled yet
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n))
                self.policy.charge(seq, n)
                budget -= n
                i += 1
                continue
            break  # ``seq`` preempted itself: every sequence after it is gone too

        # 2. Waiting sequences, while the budget, the cap and the pool allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # full blocks another request already computed (not for prompt logprobs: those need
            # the logits of every prompt position)
            hit = bm.find_cached_prefix(seq) if seq.params.prompt_logprobs is None else []
            n = min(seq.num_tokens - max(seq.num_computed_tokens, len(hit) * bm.block_size), budget)
            if not bm.can_allocate(seq, n, hit):
                if out.scheduled or not self.running:
                    break
                # Nothing runs this step: every running sequence is a beam waiting for a sibling
                # beam that is queued here. Make room by preempting the lowest-priority one (the
                # pool holds any one beam-search request whole, so this always ends).
                self._preempt(self.running[-1])
                continue
            self.waiting.pop(0)
            bm.allocate(seq, n, hit)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, admitted=True))
            self.policy.charge(seq, n)
            budget -= n
        # packed order: decodes, then prefill chunks
        out.scheduled.sort(key=lambda item: item.num_new_tokens > 1)
        out.block_copies = self.block_manager.take_pending_copies()
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: list[tuple[Sequence, int]]) -> None:
        """Commit step ``out`` once the model ran it: register the newly full blocks in the
        prefix cache, append each sampled token, and finish (freeing their blocks) the sequences
        that reached a stop token (after ``min_tokens``), ``max_tokens`` or ``max_model_len``.
        Stop *strings* need the text: the output processor checks them."""
        for item in out.scheduled:
            self.block_manager.cache_full_blocks(item.seq)
        for seq, token in sampled:
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                seq.finish_reason, seq.stop_reason = reason
                self.finish(seq)

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if (p.max_tokens is not None and n_out >= p.max_tokens) or (
            self.max_model_len is not None and seq.num_tokens >= self.max_model_len
        ):
            return "length", None
        return None

    def fork(self, parent: Sequence, child: Sequence, share: bool = True) -> None:
        """Start ``child`` from ``parent``'s tokens and KV, in the parent's place in the queues
        (parallel samples, beams). If the parent holds no KV (preempted) or the pool cannot hold
        a copy, the child is queued to compute its tokens itself."""
        shared = bool(parent.block_table) and self.block_manager.fork(parent, child, share)
        if shared and parent.status is SequenceStatus.RUNNING:
            self.add_running(child)
            return
        if child.block_table:
            self.block_manager.free(child)
        child.num_computed_tokens = 0
        self.add(child)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.policy.charge(
            seq, -seq.num_computed_tokens
        )  # its K/V is lost: recomputing is not the user's bill
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.policy.key)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
