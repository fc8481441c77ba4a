"""The KV cache manager: a pool of fixed-size physical blocks and every sequence's block table.

It owns all block accounting, and nothing else touches it: which blocks are free, how many
block tables point at each block (its reference count), which blocks each sequence holds, and
which full blocks are cached for reuse by later requests (automatic prefix caching).
The physical K/V tensors live in the model runner; this module only deals in block ids.

Prefix caching. A full block is identified by its parent block's *content id* and its own
token ids: ``key = (parent_cid, tuple(tokens))``. Content ids are handed out once and never
reused, so a key names exactly one chain of tokens from the start of the sequence and a lookup
can never return a wrong block (no hash collisions). A request reuses the longest chain of
cached blocks that prefixes its prompt and computes only the rest. Blocks whose last reference
goes away stay cached in the free queue; the queue is LRU — allocation takes its head and evicts
that block's cache entry — and a sequence frees its blocks tail first, so the ends of prompts
are evicted before the shared beginnings.

Sharing. ``fork`` makes a sequence point at all the blocks of another (parallel sampling
forks the ``n`` samples after one prefill of the prompt; beam search forks a beam that several
next beams continue). A sequence about to write into a
block that others also hold first gets a private copy (copy on write); the copies of a step
are handed to the model runner as one batch.

Invariants (checked by :meth:`BlockManager.check`, which the tests call after every step):

* a block's ref count equals the number of block-table entries that point at it;
* the free queue holds exactly the blocks with ref count 0, each once;
* every cache entry points at a block that carries that key, and every keyed block is cached;
* a sequence holds no block past those its tokens need.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # LRU free queue: the head is reused (and evicted from the cache) first
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_key: list[tuple | None] = [None] * num_blocks
        self.block_cid: list[int] = [-1] * num_blocks
        self.cached: dict[tuple, int] = {}
        self._next_cid = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached
        self.num_evictions = 0
        self.num_cow_copies = 0
        # (src, dst) block copies the model runner must do before the next forward
        self.pending_copies: list[tuple[int, int]] = []
        self._holders: dict[int, Sequence] = {}

    # --- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``seq`` must still get so that ``num_new_tokens`` more tokens have slots."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The longest chain of cached full blocks that prefixes ``seq``'s tokens.

        The last token is never taken from the cache: its logits are needed to sample.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return []
        bs, tokens = self.block_size, seq.token_ids
        blocks: list[int] = []
        parent = -1
        for i in range((len(tokens) - 1) // bs):
            block = self.cached.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            blocks.append(block)
            parent = self.block_cid[block]
        return blocks

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in ``seq``'s table of a shared block its next token would be written into."""
        i = seq.num_computed_tokens // self.block_size
        if i < len(seq.block_table) and self.ref_counts[seq.block_table[i]] > 1:
            return i
        return None

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, cached_prefix: list[int] | tuple[int, ...] = ()
    ) -> bool:
        """Whether ``seq`` (after taking ``cached_prefix``) can get slots for ``num_new_tokens``."""
        if not cached_prefix:
            cow = self._shared_write_block(seq) is not None
            return self.num_new_blocks(seq, num_new_tokens) + cow <= len(self.free_queue)
        revived = sum(1 for b in cached_prefix if self.ref_counts[b] == 0)  # taken out of the free queue
        new = self.blocks_needed(len(cached_prefix) * self.block_size + num_new_tokens) - len(cached_prefix)
        return new + revived <= len(self.free_queue)

    # --- changes ---------------------------------------------------------------------------

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_prefix: list[int] | tuple[int, ...] = ()
    ) -> None:
        """Give ``seq`` the blocks that ``num_new_tokens`` more tokens need.

        ``cached_prefix`` (from :meth:`find_cached_prefix`, for a sequence holding no block)
        is attached first and counts as computed. Raises ``RuntimeError`` if the pool cannot
        serve the request; callers ask :meth:`can_allocate` first.
        """
        first = not seq.block_table and seq.num_computed_tokens == 0
        if cached_prefix:
            if seq.block_table:
                raise RuntimeError("a cached prefix can only start a sequence's block table")
            for block in cached_prefix:
                if self.ref_counts[block] == 0:
                    del self.free_queue[block]
                self.ref_counts[block] += 1
                seq.block_table.append(block)
            seq.num_computed_tokens = len(cached_prefix) * self.block_size
            seq.num_cached_blocks = len(cached_prefix)
            seq.cache_parent_cid = self.block_cid[cached_prefix[-1]]
        if first and self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(cached_prefix) * self.block_size
        i = self._shared_write_block(seq)
        if i is not None:  # copy on write: the shared block keeps its other holders' tokens
            if not self.free_queue:
                raise RuntimeError("KV pool exhausted: no free block for a copy-on-write")
            src, dst = seq.block_table[i], self._pop_free()
            self.ref_counts[src] -= 1
            self.ref_counts[dst] = 1
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
            self.num_cow_copies += 1
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > len(self.free_queue):
            raise RuntimeError(f"KV pool exhausted: need {n} blocks, {len(self.free_queue)} free")
        for _ in range(n):
            block = self._pop_free()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        if seq.block_table:
            self._holders[seq.seq_id] = seq

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # evict: the block is about to hold other tokens
            del self.cached[key]
            self.block_key[block] = None
            self.block_cid[block] = -1
            self.num_evictions += 1
        return block

    def fork(self, parent: Sequence, child: Sequence, share: bool = True) -> bool:
        """Give ``child`` the computed KV of ``parent`` (parallel sampling, beams).

        With ``share`` the child points at the parent's blocks (ref counts go up; the diverging
        partial block is copied on write later). Without it — the layout of engines that keep
        one contiguous cache per sequence, kept as the baseline of ``pagedq bench sharing`` —
        every block is copied into a fresh one now; if the pool has too few free blocks the
        child gets none and returns ``False``: it must recompute its tokens.
        """
        if child.block_table:
            raise RuntimeError(f"{child} already holds blocks; only an empty sequence can be forked into")
        if share:
            child.block_table = list(parent.block_table)
            for block in child.block_table:
                self.ref_counts[block] += 1
        elif len(parent.block_table) > len(self.free_queue):
            child.num_computed_tokens = 0
            return False
        else:
            for src in parent.block_table:
                dst = self._pop_free()
                self.ref_counts[dst] = 1
                child.block_table.append(dst)
                self.pending_copies.append((src, dst))
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_blocks = parent.num_cached_blocks
        child.cache_parent_cid = parent.cache_parent_cid
        if child.block_table:
            self._holders[child.seq_id] = child
        return True

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.cache_parent_cid
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            key = (parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            canonical = self.cached.get(key)
            if canonical is None:
                self.cached[key] = block
                self.block_key[block] = key
                self.block_cid[block] = self._next_cid
                self._next_cid += 1
                canonical = block
            # else: the same tokens were computed twice (two prompts in one step); ours stays uncached
            parent = self.block_cid[canonical]
        if full > seq.num_cached_blocks:
            seq.num_cached_blocks = full
            seq.cache_parent_cid = parent

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``reset_prefix_cache``): only when no sequence holds
        a block, so no running sequence loses a block it shares; False (nothing done) otherwise.
        Benchmarks call it between runs of the same prompts, which would otherwise hit the cache."""
        if any(self.ref_counts):
            return False
        self.cached.clear()
        self.block_key = [None] * len(self.block_key)
        self.block_cid = [-1] * len(self.block_cid)
        return True

    def free(self, seq: Sequence) -> None:
        """Drop every block reference of ``seq`` (finished, aborted or preempted).

        Tail blocks are freed first so that they are evicted before the shared prefix blocks.
        """
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.cache_parent_cid = -1
        self._holders.pop(seq.seq_id, None)

    # --- introspection -------------------------------------------------------------------------

    def holders(self) -> Iterable[Sequence]:
        return self._holders.values()

    def num_allocated_slots_and_tokens(self) -> tuple[int, int]:
        """(slots of blocks in use, tokens those slots hold), for the KV-waste figure.

        Shared blocks count once: a block's fill is the most any holder has computed into it
        (a block full for one holder is full for all: blocks are only shared once computed).
        """
        bs = self.block_size
        partial: dict[int, int] = {}
        for seq in self._holders.values():
            n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
            for i in range(n_full, len(seq.block_table)):
                block = seq.block_table[i]
                fill = max(0, min(bs, seq.num_computed_tokens - i * bs))
                if fill > partial.get(block, -1):
                    partial[block] = fill
        slots = self.num_used_blocks * bs
        empty = sum(bs - fill for fill in partial.values())
        return slots, slots - empty

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
        free = set(self.free_queue)
        zero = {b for b, c in enumerate(self.ref_counts) if c == 0}
        if free != zero:
            raise AssertionError(
                f"the free list differs from the blocks with ref count 0: "
                f"on it but referenced {sorted(free - zero)[:8]}, unreferenced but not on it {sorted(zero - free)[:8]}"
            )
        for key, block in self.cached.items():
            if self.block_key[block] != key:
                raise AssertionError(
                    f"cache entry for block {block} does not match the key the block carries"
                )
        keyed = sum(1 for k in self.block_key if k is not None)
        if keyed != len(self.cached):
            raise AssertionError(
                f"{keyed} blocks carry a cache key but the cache has {len(self.cached)} entries"
            )
