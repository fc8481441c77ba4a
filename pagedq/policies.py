"""Scheduling policies: the order in which the scheduler admits, runs and preempts sequences.

The registry :data:`POLICIES` is the one list of policy names: the engine config, the CLI, the
server's options and the metrics read it. A new policy is a subclass with a ``name`` and a
``description``, registered with :func:`register_policy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence


class SchedulingPolicy:
    """Orders sequences: lower keys run first and are preempted last. FCFS by default.

    A policy is made with the engine's ``user_weights`` (None when not given); a policy that
    cannot use weights sets ``weighted = False`` and the config refuses weights for it.
    """

    name = "fcfs"
    description = "first come, first served"
    weighted = False
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

    def __init__(self, weights: dict[str, float] | None = None):
        if weights is not None and not self.weighted:
            raise ValueError(f"user_weights only apply to a weighted policy, not {self.name!r}")

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
    description = "per-user fair share, weighted by user_weights"
    weighted = True
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


POLICIES: dict[str, type[SchedulingPolicy]] = {}


def register_policy(cls: type[SchedulingPolicy]) -> type[SchedulingPolicy]:
    """Add a policy class to :data:`POLICIES` under its ``name`` (usable as a decorator)."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"a scheduling policy named {cls.name!r} is already registered")
    POLICIES[cls.name] = cls
    return cls


register_policy(SchedulingPolicy)
register_policy(FairSharePolicy)


def policy_help() -> str:
    """``fcfs (first come, first served) | fair (...)``: for option help texts."""
    return " | ".join(f"{name} ({cls.description})" for name, cls in POLICIES.items())


def check_policy(name: object, weights: object = None) -> None:
    """``ValueError`` unless ``name`` is a registered policy that takes ``weights`` (if given)."""
    if name not in POLICIES:
        names = " or ".join(f"{n!r} ({cls.description})" for n, cls in POLICIES.items())
        raise ValueError(f"scheduling_policy must be {names}, got {name!r}")
    if weights is not None and not POLICIES[name].weighted:
        raise ValueError(f"user_weights only apply to a weighted policy, not scheduling_policy={name!r}")


def make_policy(name: str, weights: dict[str, float] | None = None) -> SchedulingPolicy:
    check_policy(name, weights)
    return POLICIES[name](weights)
