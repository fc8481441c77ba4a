"""``pagedq bench serve-load``: a bounded load and fault run against a real ``pagedq serve``.

``clients`` streaming clients of ``users`` users (one API key each) send requests for
``seconds`` per round; a share of them hang up mid-stream; a malformed request goes out every
``1 / malformed_per_second`` seconds; the engine process is killed (``kill -9``) in the middle of
each round. Every request sent is counted once::

    sent = completed + client-aborted + rejected + failed-by-the-kill + hung + other

``completed``: every choice's finish_reason and ``[DONE]``; ``client-aborted``: we hung up;
``rejected``: a 4xx (malformed, or over a limit); ``failed-by-the-kill``: an explicit 503 or
SSE error event while the engine was down; ``hung``: no end within ``request_timeout``; ``other``:
anything else. After each round the run waits for the engine and reads the server's metrics: KV
blocks in use and prompts in flight must be back to 0. Resident memory of the server and engine
processes is printed per round. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from pagedq.config import EngineConfig
from pagedq.options import add_arguments as add_option_arguments
from pagedq.sampling_params import SamplingParams

from . import servers

OUTCOMES = ("completed", "client_aborted", "rejected", "failed_by_kill", "hung", "other")
MALFORMED = [
    b'{"prompt": [1, "a"], "max_tokens": 2}',
    b'{"prompt": [1, 2.5, 7]}',
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "logit_bias": [1]}',
    b"\xff\xfe{",
    b'{"prompt": "x", "stream": true, "stream_options": "x"}',
    b'{"prompt": "x", "n": 1000}',
    b'{"prompt": [1, 999999999]}',
]
PROMPTS = [
    "def main(argv):\n    ",
    "import os\nimport sys\n",
    "class Parser:\n    def __init__(self",
    "for i in range(",
]


@dataclass
class Round:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    sent: int = 0
    tokens: int = 0
    seconds: float = 0.0
    kv_blocks_in_use: float = -1
    prompts_in_flight: float = -1
    server_rss_mib: float = 0.0
    engine_rss_mib: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return self.sent == sum(self.counts.values())


def engine_pids(server_pid: int) -> list[int]:
    """The engine processes of a ``pagedq serve`` process (not multiprocessing's resource tracker)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(server_pid)], capture_output=True, text=True
    ).stdout
    pids = []
    for pid in (int(x) for x in out.split()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().split(")")[-1].split()[0] == "Z"
        except OSError:
            continue
        if "multiprocessing" in cmd and "resource_tracker" not in cmd and not zombie:
            pids.append(pid)
    return pids


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(ln for ln in f if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


async def post_completion(port: int, body: bytes, key: str | None = None):
    """POST ``body`` to ``/v1/completions`` on a fresh connection (``Connection: close``);
    returns (reader, writer, status, headers) with the body left to read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"{auth}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
    except BaseException:
        writer.close()
        raise
    return reader, writer, status, headers


async def stream_request(port: int, body: bytes, key: str, hangup_after: int | None) -> tuple[str, int, str]:
    """One request over a fresh connection; returns (outcome, tokens received, detail)."""
    reader, writer, status, headers = await post_completion(port, body, key)
    try:
        if status != 200:
            detail = (await reader.read()).decode(errors="replace")[:200]
            retry = headers.get("retry-after", "")
            if 400 <= status < 500:
                return "rejected", 0, retry
            return ("failed_by_kill", 0, retry) if status == 503 else ("other", 0, f"{status}: {detail}")
        return await _read_stream(reader, headers, hangup_after)
    finally:
        writer.close()


async def _read_stream(reader, headers: dict, hangup_after: int | None) -> tuple[str, int, str]:
    """Read an SSE stream to its end (or hang up after ``hangup_after`` tokens)."""
    tokens, done, reasons = 0, False, 0
    async for event, data in sse_events(reader, headers):
        if event == "error":
            if "engine process" in data or "shutting down" in data:
                return "failed_by_kill", tokens, ""
            return "other", tokens, f"error event: {data[:200]}"
        if data == "[DONE]":
            done = True
            break
        for c in json.loads(data)["choices"]:
            tokens += len(c["token_ids"])
            reasons += c["finish_reason"] is not None
        if hangup_after is not None and tokens >= hangup_after:
            return "client_aborted", tokens, ""
    if done and reasons == 1:
        return "completed", tokens, ""
    return "other", tokens, f"stream ended: [DONE] {done}, finish reasons {reasons}"


async def sse_events(reader: asyncio.StreamReader, headers: dict):
    """``(event name or None, data)`` of each ``data:`` line of a server-sent event stream."""
    event = None
    async for line in sse_lines(reader, headers):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data: "):
            yield event, line[6:]


async def sse_lines(reader: asyncio.StreamReader, headers: dict):
    """The decoded lines of a (chunked) streamed body."""
    buf = b""
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            buf += data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode().rstrip("\r")


async def _timed(request, timeout: float) -> tuple[str, int, str]:
    """A request's outcome, or ``hung`` after ``timeout`` s (a broken connection is ``other``)."""
    try:
        return await asyncio.wait_for(request, timeout)
    except asyncio.TimeoutError:
        return "hung", 0, ""
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        return "other", 0, f"{type(e).__name__}: {e}"


async def _run_round(
    args, port: int, keys: list[str], server_pid: int, rnd: Round, rng: random.Random
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    stop_at = start + args.seconds

    async def client(i: int):
        key = keys[i % len(keys)]
        while loop.time() < stop_at:
            hangup = rng.randint(1, 8) if rng.random() < args.hangup_fraction else None
            body = {
                "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, args.max_tokens), "stream": True,
                "ignore_eos": True, "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 2**31),
            }  # fmt: skip
            rnd.sent += 1
            outcome, tokens, detail = await _timed(
                stream_request(port, json.dumps(body).encode(), key, hangup), args.request_timeout
            )
            rnd.counts[outcome] += 1
            rnd.tokens += tokens
            if outcome == "other":
                rnd.notes.append(f"client {i}: {detail}")
            if outcome in ("failed_by_kill", "rejected") and detail.isdigit():  # honour Retry-After
                await asyncio.sleep(min(float(detail), max(0.0, stop_at - loop.time())))

    async def malformed():
        if args.malformed_per_second <= 0:
            return
        while loop.time() < stop_at:
            await asyncio.sleep(1 / args.malformed_per_second)
            rnd.sent += 1
            body = rng.choice(MALFORMED)
            outcome, _, detail = await _timed(stream_request(port, body, keys[0], None), args.request_timeout)
            # a 400 from the schema, or (token ids checked by the engine) a 503 while it restarts
            if outcome not in ("rejected", "failed_by_kill", "hung"):
                rnd.notes.append(f"malformed {body[:40]!r}: {outcome} {detail}")
                outcome = "other"
            rnd.counts[outcome] += 1

    async def killer():
        if not args.kill:
            return
        await asyncio.sleep(args.seconds / 2)
        for pid in engine_pids(server_pid):
            os.kill(pid, signal.SIGKILL)

    await asyncio.gather(*(client(i) for i in range(args.clients)), malformed(), killer())
    rnd.seconds = loop.time() - start


def _get(url: str, key: str | None = None) -> str:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    line = next((ln for ln in text.splitlines() if ln.startswith(name + "{")), None)
    return float(line.rsplit(" ", 1)[1]) if line else -1.0


def _settle(base: str, key: str, rnd: Round, server_pid: int, timeout: float = 120) -> None:
    """Wait for the engine to be ready and idle again; record what is left in use and memory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ready = json.loads(_get(base + "/ready"))["status"] == "ready"
        except OSError:
            ready = False
        if ready:
            text = _get(base + "/v1/metrics", key)
            rnd.kv_blocks_in_use = _metric(text, "pagedq_kv_blocks_in_use")
            rnd.prompts_in_flight = _metric(text, "pagedq_prompts_in_flight")
            if rnd.kv_blocks_in_use == 0 and rnd.prompts_in_flight == 0:
                break
        time.sleep(0.2)
    rnd.server_rss_mib = rss_mib(server_pid)
    rnd.engine_rss_mib = sum(rss_mib(p) for p in engine_pids(server_pid))


def run(args) -> list[Round]:
    """Start ``pagedq serve``, run ``args.rounds`` rounds, stop it; returns the rounds."""
    if args.request_timeout is None:
        args.request_timeout = 60.0
    rng = random.Random(args.client_seed)
    tmp = tempfile.mkdtemp(prefix="pagedq-serve-load-")
    keys = [f"load-key-{u}" for u in range(args.users)]
    with open(os.path.join(tmp, "keys.txt"), "w") as f:
        f.writelines(f"{k} user{u}\n" for u, k in enumerate(keys))
    server = servers.start_pagedq(
        args.model,
        [
            "--dtype",
            args.dtype,
            "--api-keys",
            os.path.join(tmp, "keys.txt"),
            "--max-model-len",
            str(args.max_model_len),
        ],
        os.path.join(tmp, "server.log"),
    )
    port = server.port
    base = server.base
    rounds: list[Round] = []
    try:
        for i in range(args.rounds):
            rnd = Round()
            asyncio.run(_run_round(args, port, keys, server.proc.pid, rnd, rng))
            _settle(base, keys[0], rnd, server.proc.pid)
            rounds.append(rnd)
            _print_round(i + 1, rnd)
    finally:
        server.stop()
    return rounds


def _print_round(i: int, r: Round) -> None:
    c = r.counts
    print(
        f"round {i}: sent {r.sent} = completed {c['completed']} + client-aborted {c['client_aborted']} + "
        f"rejected {c['rejected']} + failed-by-kill {c['failed_by_kill']} + hung {c['hung']} + other {c['other']}"
        f" [{'ok' if r.balanced else 'UNBALANCED'}]; {r.tokens} tokens in {r.seconds:.1f} s "
        f"({r.tokens / max(r.seconds, 1e-9):.0f} tok/s); after: KV blocks in use {r.kv_blocks_in_use:.0f}, "
        f"prompts in flight {r.prompts_in_flight:.0f}; RSS server {r.server_rss_mib:.0f} MiB, "
        f"engine {r.engine_rss_mib:.0f} MiB",
        flush=True,
    )
    for note in r.notes[:5]:
        print("   ", note)


def main(args) -> None:
    rounds = run(args)
    first = rounds[0]
    growth = [r.server_rss_mib - first.server_rss_mib for r in rounds[1:]]
    print(
        f"server RSS after round 1: {first.server_rss_mib:.0f} MiB; growth after: "
        + (", ".join(f"{g:+.0f}" for g in growth) or "-")
        + " MiB"
    )
    bad = [i + 1 for i, r in enumerate(rounds) if not r.balanced or r.counts["hung"] or r.counts["other"]]
    left = [i + 1 for i, r in enumerate(rounds) if r.kv_blocks_in_use != 0 or r.prompts_in_flight != 0]
    if bad or left:
        raise SystemExit(
            f"serve-load failed: rounds with hangs/other/unbalanced {bad}, with leftovers {left}"
        )


def add_arguments(p) -> None:
    p.add_argument("--clients", type=int, default=48, help="serve-load: concurrent streaming clients")
    p.add_argument("--users", type=int, default=3, help="serve-load: users (one API key each)")
    p.add_argument("--seconds", type=float, default=60.0, help="serve-load: seconds per round")
    p.add_argument("--rounds", type=int, default=5, help="serve-load: rounds")
    p.add_argument(
        "--hangup-fraction", type=float, default=0.25, help="serve-load: share of requests hung up"
    )
    p.add_argument("--malformed-per-second", type=float, default=1.0, help="serve-load: malformed requests/s")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="serve-load: do not kill the engine")
    # a request's max_tokens is drawn from 8 to this; the server's max_model_len
    add_option_arguments(p, SamplingParams, only=("max_tokens",), defaults={"max_tokens": 64})
    add_option_arguments(p, EngineConfig, only=("max_model_len",), defaults={"max_model_len": 512})
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="serve-load, online: a request not ended by then hung/failed (default 60 s; online 900 s)",
    )
    p.add_argument(
        "--client-seed",
        type=int,
        default=0,
        help="serve-load, online: seed of the clients' choices and arrival times",
    )
