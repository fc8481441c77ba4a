"""Block accounting: allocation, freeing and the invariants check() guards."""

from __future__ import annotations

import pytest

from pagedq.block_manager import BlockManager
from pagedq.sampling_params import SamplingParams
from pagedq.scheduler import Scheduler
from pagedq.sequence import Request, Sequence


def _seq(n_tokens: int, arrival: int = 0) -> Sequence:
    req = Request(str(arrival), None, list(range(1, n_tokens + 1)), SamplingParams(), arrival)
    seq = Sequence(req, 0)
    req.seqs.append(seq)
    return seq


def test_allocate_and_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = _seq(9)
    assert bm.num_new_blocks(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3
    assert bm.num_free_blocks == 7
    bm.check()
    s.num_computed_tokens = 9
    s.token_ids.append(5)
    assert bm.num_new_blocks(s, 1) == 0  # slot 9 is in the third block
    s.num_computed_tokens = 12
    s.token_ids += [5, 5, 5]
    assert bm.num_new_blocks(s, 1) == 1
    bm.free(s)
    assert bm.num_free_blocks == 10
    assert s.block_table == []
    bm.check()


def test_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = _seq(3)
    bm.allocate(s, 3)
    bm.ref_counts[s.block_table[0]] = 2
    with pytest.raises(AssertionError, match="ref counts"):
        bm.check()
    bm.ref_counts[s.block_table[0]] = 1
    bm.free_queue[s.block_table[0]] = None
    with pytest.raises(AssertionError, match="free list"):
        bm.check()


def test_scheduler_preempts_newest_and_respects_budget():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6)
    a, b = _seq(4, 0), _seq(4, 1)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    # budget 6: a's whole prompt (4) and a 2-token chunk of b
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [(a, 4), (b, 2)]
    sched.update_from_output(out, [(a, 9)])  # a's prompt is done: its first token
    out = sched.schedule()
    # packed order: a's decode first, then b's next chunk
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [(a, 1), (b, 2)]
    assert [x.token_ids for x in out.scheduled] == [[9], [3, 4]]
    assert [list(x.positions) for x in out.scheduled] == [[4], [2, 3]]
    sched.update_from_output(out, [])
    bm.check()
    # grow a until the pool (4 blocks) runs dry: b, the newest, is preempted
    a.token_ids += [9] * 7
    a.num_computed_tokens = 11
    b.token_ids.append(9)
    out = sched.schedule()
    assert out.preempted == [b]
    assert b.num_computed_tokens == 0
    assert b.block_table == []
    assert sched.waiting == [b]
    assert sched.num_preemptions == 1
    bm.check()
