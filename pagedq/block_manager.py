"""The KV cache manager: a pool of fixed-size physical blocks and every sequence's block table.

It owns all block accounting, and nothing else touches it: which blocks are free, how many
block tables point at each block (its reference count), and which blocks each sequence holds.
The physical K/V tensors live in the model runner; this module only deals in block ids.

Invariants (checked by :meth:`BlockManager.check`, which the tests call after every step):

* every block is either free (ref count 0, on the free list once) or referenced (ref count > 0);
* a block's ref count equals the number of block-table entries that point at it;
* a sequence holds exactly the blocks it needs for the tokens it has computed or is about
  to compute — never a block past that.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Sequences that currently hold blocks, by id: lets check() see every block table.
        self._holders: dict[int, Sequence] = {}

    # --- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``seq`` must still get so that ``num_new_tokens`` more tokens have slots."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self.free_block_ids)

    # --- changes ---------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give ``seq`` the blocks that ``num_new_tokens`` more tokens need.

        Raises ``RuntimeError`` if the pool cannot; callers ask :meth:`can_allocate` first.
        """
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self.free_block_ids):
            raise RuntimeError(f"KV pool exhausted: need {n} blocks, {len(self.free_block_ids)} free")
        for _ in range(n):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        if seq.block_table:
            self._holders[seq.seq_id] = seq

    def free(self, seq: Sequence) -> None:
        """Drop every block reference of ``seq`` (finished, aborted or preempted)."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table = []
        self._holders.pop(seq.seq_id, None)

    # --- introspection -------------------------------------------------------------------------

    def holders(self) -> Iterable[Sequence]:
        return self._holders.values()

    def num_allocated_slots_and_tokens(self) -> tuple[int, int]:
        """(slots in blocks held by sequences, tokens those slots hold), for the KV-waste figure."""
        slots = tokens = 0
        for seq in self._holders.values():
            slots += len(seq.block_table) * self.block_size
            tokens += min(seq.num_computed_tokens, len(seq.block_table) * self.block_size)
        return slots, tokens

    def check(self) -> None:
        """Raise ``AssertionError`` naming the first broken invariant."""
        counts = [0] * self.num_blocks
        for seq in self._holders.values():
            if not seq.block_table:
                raise AssertionError(f"{seq} is registered as a holder but holds no block")
            for block_id in seq.block_table:
                if not 0 <= block_id < self.num_blocks:
                    raise AssertionError(f"{seq} holds block {block_id}, outside the pool")
                counts[block_id] += 1
            if len(seq.block_table) > self.blocks_needed(max(seq.num_tokens, 1)):
                raise AssertionError(f"{seq} holds more blocks than its {seq.num_tokens} tokens need")
        if counts != self.ref_counts:
            diff = [(b, c, r) for b, (c, r) in enumerate(zip(counts, self.ref_counts)) if c != r]
            raise AssertionError(
                f"ref counts differ from block-table references (block, refs, count): {diff[:8]}"
            )
        free = list(self.free_block_ids)
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        for block_id in free:
            if self.ref_counts[block_id] != 0:
                raise AssertionError(
                    f"block {block_id} is on the free list with ref count {self.ref_counts[block_id]}"
                )
        in_use = sum(1 for c in self.ref_counts if c > 0)
        if in_use + len(free) != self.num_blocks:
            raise AssertionError(
                f"{in_use} referenced + {len(free)} free blocks != pool size {self.num_blocks}: a block leaked"
            )
