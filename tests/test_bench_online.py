"""``pagedq bench online``: arrivals, percentiles, a stream cut short counted as a failure, and a
whole run against a real ``pagedq serve`` (numbers are printed, never asserted)."""

from __future__ import annotations

import asyncio
import itertools
import math
import subprocess
import sys

import pytest

from pagedq.bench import online


def test_arrivals_are_poisson_seeded_and_inf_sends_everything_at_once():
    a = online.arrivals(2000, 4.0, seed=1)
    assert a == online.arrivals(2000, 4.0, seed=1)
    assert a != online.arrivals(2000, 4.0, seed=2)
    assert a[0] == 0.0
    assert all(x <= y for x, y in itertools.pairwise(a))
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert online.arrivals(5, math.inf, seed=0) == [0.0] * 5


def test_rates_are_checked_and_named():
    assert online.parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(SystemExit, match=r"--request-rates: 'fast' is not a number"):
        online.parse_rates("1,fast")
    with pytest.raises(SystemExit, match=r"--request-rates: '0' must be above 0"):
        online.parse_rates("0")


def test_latency_metrics_and_percentiles():
    done = online.Timing(sent=0.0, first=0.5, end=1.5, tokens=5, gaps=[0.25] * 4)
    slow = online.Timing(sent=1.0, first=3.0, end=7.0, tokens=3, gaps=[2.0, 2.0])
    failed = online.Timing(sent=0.0, error="HTTP 503")
    r = online.RateResult("pagedq", 1.0, 10.0, [done, slow, failed])
    assert r.values("ttft") == [0.5, 2.0]
    assert r.values("tpot") == [0.25, 2.0]
    assert r.percentile("ttft", 0.5) == pytest.approx(1.25)
    assert r.percentile("itl", 0.99) == pytest.approx(2.0)
    assert r.output_tps == pytest.approx(0.8)  # failed requests' tokens never count
    assert len(r.completed) == 2


def _serve_once(payload: bytes):
    """A one-shot HTTP server on loopback answering every request with ``payload``."""

    async def handle(reader, writer):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(payload)
        await writer.drain()
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'data: {"choices": [{"text": "a"}]}\n\n', "stream ended with [DONE] False after 0 of 3 tokens"),
        (
            b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [], "usage": {"completion_tokens": 1}}\n\n'
            b"data: [DONE]\n\n",
            "stream ended with [DONE] True after 1 of 3 tokens",
        ),
        (b'event: error\ndata: {"error": "engine died"}\n\n', "error event"),
    ],
)
def test_a_stream_cut_short_is_a_failure_not_a_result(body, error):
    async def main():
        server = await _serve_once(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + body)
        port = server.sockets[0].getsockname()[1]
        timing = online.Timing(sent=0.0)
        await online._request(port, b"{}", timing, want=3, timeout=10)
        server.close()
        return timing

    timing = asyncio.run(main())
    assert timing.error is not None
    assert error in timing.error


@pytest.mark.slow
def test_bench_online_runs_against_pagedq_serve(tiny_llama):
    cmd = [
        sys.executable, "-m", "pagedq", "bench", "online", "--model", tiny_llama, "--dtype", "float32",
        "--num-requests", "6", "--request-rates", "20,inf", "--max-model-len", "1024", "--request-timeout", "120",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pagedq   rate    20/s: 6/6 completed" in out.stdout
    assert "pagedq   rate   inf/s: 6/6 completed" in out.stdout
    assert "ttft p50" in out.stdout


def test_the_servers_fit_the_workloads_longest_request():
    """serve-load's default max_model_len (512) would refuse the 512-token prompts and cut
    outputs short: the online servers get at least the longest prompt + output, and 2048."""
    from pagedq.bench.workloads import Workload

    w = Workload("online", [[1] * 512, [1] * 16], [256, 32])
    assert online.serve_max_model_len(512, w) == 2048
    assert online.serve_max_model_len(4096, w) == 4096
    long = Workload("online", [[1] * 3000], [100])
    assert online.serve_max_model_len(512, long) == 3100


def test_each_rate_gets_fresh_prompt_text_of_the_same_shape(tiny_llama):
    """A later rate must not be served from the prefix cache an earlier rate filled: shifted
    windows keep every prompt's length and output but share no first KV block (16 tokens)."""
    from transformers import AutoTokenizer

    from pagedq.bench import workloads

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    passes = [workloads.throughput(tok, 32, window_shift=k * 32) for k in range(3)]
    for w in passes[1:]:
        assert [len(p) for p in w.prompts] == [len(p) for p in passes[0].prompts]
        assert w.output_lens == passes[0].output_lens
    heads = [tuple(p[:16]) for w in passes for p in w.prompts]
    assert len(set(heads)) == len(heads)
    assert workloads.throughput(tok, 32).prompts == passes[0].prompts  # shift 0: the workload itself


def test_idle_cpu_seconds_count_a_servers_children():
    """The idle-peer check sums the server's process tree (vLLM computes in a child process)."""
    import os
    import signal
    import time

    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'], timeout=20)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline, busy = time.monotonic() + 15, 0.0
        while busy < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = online.tree_cpu_seconds(proc.pid)
        assert busy >= 0.3  # the child's spinning, counted under the parent
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its spinning child
        proc.wait(timeout=30)
    assert online.tree_cpu_seconds(proc.pid) == 0.0  # ended: nothing left to count
