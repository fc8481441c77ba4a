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

The order is the policy's: first come first served, or per-user fair share
(:class:`FairSharePolicy`, ``scheduling_policy="fair"``) for one engine shared by many users.

A beam-search request advances all its beams together: a beam whose next-token logits are in
sits in the running set without being scheduled until its sibling beams have theirs.

The scheduler only does CPU bookkeeping; the model runner turns its output into tensors.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class SchedulingPolicy:
    """Orders sequences: lower keys run first and are preempted last. FCFS by default."""

    name = "fcfs"
    dynamic = False  # whether keys change as tokens are served (the queue is then re-sorted)

    def key(self, seq: Sequence) -> tuple:
        return (seq.request.arrival, seq.index)

    def activate(self, user: str, active: set[str]) -> None:
        """A sequence of ``user`` was queued while ``active`` users had work in the scheduler."""

    def charge(self, seq: Sequence, num_tokens: int) -> None:
        """``num_tokens`` of ``seq`` were scheduled for computation (negative: computed tokens lost
        to a preemption, refunded because they will be computed again)."""

    def victim_for(self, waiting: Sequence, running: list[Sequence], max_num_seqs: int) -> Sequence | None:
        """A running sequence to preempt so that ``waiting`` (the head of the queue) can run in a
        full batch; None to let it wait (FCFS never preempts for order)."""
        return None

    def forget(self, user: str) -> None:
        """``user`` has been idle for long: drop what the policy keeps about them."""


class FairSharePolicy(SchedulingPolicy):
    """Per-user fair share: the user who has been served the fewest tokens (prompt and output
    tokens computed, divided by the user's weight) goes first — at every free slot the
    least-served user's request is admitted, and when blocks run out the most-served user's
    newest sequence is preempted. Within one user, first come first served.

    The order is virtual time, as in start-time fair queueing: a user who (re)appears starts at
    the least virtual time among the users with work queued, so time away is not banked (a user
    back from lunch does not hold everyone else up until they catch up). That catch-up moves the
    user's *virtual time* only; the tokens a user was really served are counted by the engine
    (``LLMEngine.user_stats``). Keys are fixed within one step.

    A full batch is shared too: when the least-served user has a request waiting while running
    fewer sequences than its share of ``max_num_seqs`` (by weight, among users with work), and
    another user runs at least one more than its share, that user's newest sequence is preempted
    (its cached full blocks make the recomputation cheap). Without this, a user who keeps a few
    requests in flight loses a slot each time one of them finishes and another user's queued
    request takes it, and drifts far below its share.
    """

    name = "fair"
    dynamic = True

    def __init__(self, weights: dict[str, float] | None = None):
        self.weights = dict(weights or {})
        for user, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w == float("inf"):
                raise ValueError(f"user weight must be a finite number > 0, got {w!r} for {user!r}")
        self.vtime: dict[str, float] = {}

    def key(self, seq: Sequence) -> tuple:
        return (self.vtime.get(seq.request.user, 0.0), seq.request.arrival, seq.index)

    def activate(self, user: str, active: set[str]) -> None:
        if user in active:
            return
        floor = min((self.vtime.get(u, 0.0) for u in active), default=None)
        if floor is not None:
            self.vtime[user] = max(self.vtime.get(user, 0.0), floor)
        else:
            self.vtime.setdefault(user, 0.0)

    def charge(self, seq: Sequence, num_tokens: int) -> None:
        user = seq.request.user
        self.vtime[user] = self.vtime.get(user, 0.0) + num_tokens / self.weights.get(user, 1.0)

    def victim_for(self, waiting: Sequence, running: list[Sequence], max_num_seqs: int) -> Sequence | None:
        counts: dict[str, int] = {}
        for s in running:
            counts[s.request.user] = counts.get(s.request.user, 0) + 1
        users = set(counts) | {waiting.request.user}
        total = sum(self.weights.get(u, 1.0) for u in users)

        def share(u: str) -> float:
            return max_num_seqs * self.weights.get(u, 1.0) / total

        mine = waiting.request.user
        if counts.get(mine, 0) >= share(mine):
            return None
        over = [u for u in counts if u != mine and counts[u] >= share(u) + 1]
        if not over:
            return None
        most = max(over, key=lambda u: self.vtime.get(u, 0.0))
        candidates = [s for s in running if s.request.user == most and s.request.beam is None]
        return max(candidates, key=self.key) if candidates else None

    def forget(self, user: str) -> None:
        self.vtime.pop(user, None)


def make_policy(name: str, weights: dict[str, float] | None = None) -> SchedulingPolicy:
    if name == "fcfs":
        return SchedulingPolicy()
    if name == "fair":
        return FairSharePolicy(weights)
    raise ValueError(f"scheduling_policy must be 'fcfs' or 'fair', got {name!r}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # taken from the waiting queue in this step (a new request, or one resuming after a
    # preemption): the first suspects when the step fails (see LLMEngine.step)
    admitted: bool = False

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence's tokens, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy | None = None,
    ):
        self.block_manager = block_manager
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
        return out

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
