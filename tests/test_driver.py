"""The engine driver's lock and intake: callers from other threads get in between steps."""

import threading
import time

import pytest

from pagedq.driver import EngineDriver


class _BusyEngine:
    """Always has work; each step holds the driver's lock for ``step_s`` seconds (the GIL
    released, as the model's kernels release it). ``add_request`` notes the step it got in at."""

    def __init__(self, step_s: float):
        self.step_s = step_s
        self.steps = 0
        self.admitted: list[tuple[int, int]] = []  # (steps when the caller asked, steps when in)
        self.asked = 0
        self.ids: list[str] = []

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self):
        time.sleep(self.step_s)
        self.steps += 1
        return []

    def add_request(self, prompt, params=None, request_id=None, user=None):
        if prompt.get("refuse"):
            raise ValueError(f"prompt refused: {prompt['refuse']}")
        self.admitted.append((self.asked, self.steps))
        self.ids.append(request_id)
        return request_id or str(len(self.admitted))

    def abort(self, request_id):
        return None


def test_a_request_from_another_thread_waits_for_one_step_at_most_while_the_loop_is_busy():
    """A plain lock went back to the loop step after step (it takes the lock again within
    microseconds of releasing it, before a woken waiter runs): served at 8 requests/s, a
    request waited for the lock 95 ms at the median and up to 548 ms, several steps. The
    driver now lets every waiting caller in before its next step."""
    engine = _BusyEngine(step_s=0.01)
    driver = EngineDriver(engine)
    try:
        waits = []
        for i in range(30):
            engine.asked = engine.steps
            t = time.perf_counter()
            driver.add({"prompt_token_ids": [1]}, request_id=f"r{i}")
            waits.append(time.perf_counter() - t)
            time.sleep(0.003 * (i % 4))  # arrive at different moments of a step
        behind = [done - asked for asked, done in engine.admitted]
        assert max(behind) <= 1, behind  # admitted within the step running when asked (or the next)
        # aborts and submits from several threads at once get in too, and the loop goes on
        before = engine.steps
        threads = [threading.Thread(target=driver.abort, args=(f"r{i}",)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=5)
        assert not any(th.is_alive() for th in threads)
        time.sleep(0.05)
        assert engine.steps > before
    finally:
        driver.close()
    assert not driver._thread.is_alive()


def test_requests_handed_to_the_intake_join_the_next_step_without_waiting_for_the_running_one():
    """``enqueue`` (the serving worker's way in) never waits for the engine lock: six requests
    handed in during one step all join the next one, where six callers of ``add`` on one thread
    would take six steps (two intake threads: three). Each caller hears ``done(None)`` once its
    request is in the engine, ``done(error)`` when the engine refuses it; a request aborted while
    queued is never added; one still queued at ``close`` is refused."""
    engine = _BusyEngine(step_s=0.05)
    heard: dict[str, object] = {}
    driver = EngineDriver(engine)
    try:
        time.sleep(0.02)  # a step under way
        engine.asked = asked = engine.steps
        for i in range(6):
            driver.enqueue(
                {"prompt_token_ids": [1]}, None, f"q{i}", done=lambda e, i=i: heard.__setitem__(f"q{i}", e)
            )
        driver.enqueue({"refuse": "too long"}, None, "bad", done=lambda e: heard.__setitem__("bad", e))
        assert engine.steps == asked  # handed in while that step still runs
        deadline = time.monotonic() + 5
        while len(heard) < 7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [heard[f"q{i}"] for i in range(6)] == [None] * 6
        assert isinstance(heard["bad"], ValueError)
        assert "too long" in str(heard["bad"])
        assert engine.ids == [f"q{i}" for i in range(6)]
        assert {done - asked for _, done in engine.admitted} == {1}  # all before the very next step
        # aborted while queued: never reaches the engine, its caller hears nothing
        with driver.lock:  # hold the loop between steps so the request stays queued
            driver.enqueue(
                {"prompt_token_ids": [1]}, None, "gone", done=lambda e: heard.__setitem__("gone", e)
            )
            assert driver.abort("gone") is None
        time.sleep(0.15)
        assert "gone" not in engine.ids
        assert "gone" not in heard
    finally:
        with driver.lock:
            driver.enqueue(
                {"prompt_token_ids": [1]}, None, "late", done=lambda e: heard.__setitem__("late", e)
            )
        driver.close()
    assert not driver._thread.is_alive()
    assert "late" not in engine.ids
    assert isinstance(heard["late"], RuntimeError)
    with pytest.raises(RuntimeError, match="closed"):
        driver.enqueue({"prompt_token_ids": [1]}, None, "after")
