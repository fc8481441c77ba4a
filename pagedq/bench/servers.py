"""The peers' processes: servers that serving benchmarks start and stop (``pagedq serve``, vLLM's
OpenAI server), and offline peer scripts run in another virtual environment (:func:`peer_result`).

Each server runs as a child process on loopback with its log in a file; :func:`Server.stop` ends
it (SIGTERM, then SIGKILL after a grace period), so a benchmark never leaves one behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: IO[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self, grace: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _wait(server: Server, ready, timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    while not ready():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            tail = server.log_tail()
            server.stop(grace=5)
            raise RuntimeError(f"{server.name} did not start within {timeout:.0f} s:\n{tail}")
        time.sleep(0.5)
    return server


def start_pagedq(model: str, args: list[str], log_path: str, timeout: float = 300.0) -> Server:
    """``pagedq serve MODEL ARGS`` on a free loopback port; returns once it says it serves."""
    port = free_port()
    log = open(log_path, "w+")  # noqa: SIM115 - closed by Server.stop
    cmd = [sys.executable, "-m", "pagedq", "serve", model, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    server = Server("pagedq serve", proc, port, log)
    return _wait(server, lambda: "pagedq: serving" in server.log_tail(10**9), timeout)


def peer_result(cmd: list[str], name: str, env: dict[str, str] | None = None) -> dict:
    """Run a peer script (``vllm_peer.py``, ``llama_cpp_peer.py``) to its end and return the JSON
    of its ``PAGEDQ_PEER_RESULT`` line; a failed run raises with the end of its standard error."""
    import json

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PAGEDQ_PEER_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


class SteppedPeer:
    """A peer script in its ``stepped`` mode (``vllm_peer.py``): started once, then one run per
    :meth:`run`, so its runs alternate with pagedq's on the same machine state. A peer that
    dies or answers out of protocol raises ``RuntimeError`` with the end of its standard error
    (kept in a temporary file: a full pipe would block it)."""

    def __init__(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.name = name
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open until close())
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True
        )
        try:
            self.startup = float(self._expect("PAGEDQ_PEER_READY "))
        except BaseException:  # a failed start, or Ctrl-C during its minutes: no orphan left
            self.proc.kill()
            self.close()
            raise

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        code = self.proc.wait()
        self._err.seek(0)
        raise RuntimeError(f"the {self.name} run failed (exit {code}):\n{self._err.read()[-3000:]}")

    def run(self) -> float:
        """One run of the workload: its seconds."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # if it died, _expect says how
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        return float(self._expect("PAGEDQ_PEER_RUN "))

    def close(self) -> None:
        """End the peer (its input closes: it prints its result and exits; killed if it hangs)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


def vllm_env(python: str) -> dict[str, str]:
    """vLLM's CPU build as docs/benchmarks.md sets it up: all cores, 4 GiB of KV, tcmalloc and
    the venv's libiomp5 preloaded (when present)."""
    venv_lib = os.path.join(os.path.dirname(os.path.dirname(python)), "lib")
    preload = [
        p
        for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", os.path.join(venv_lib, "libiomp5.so"))
        if os.path.isfile(p)
    ]
    return dict(
        os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="4", LD_PRELOAD=":".join(preload)
    )


def start_vllm(
    python: str,
    model_dir: str,
    name: str,
    dtype: str,
    max_model_len: int,
    log_path: str,
    timeout: float = 900.0,
) -> Server:
    """vLLM's OpenAI server from its own venv (``python -m vllm.entrypoints.openai.api_server``:
    the wheel's ``vllm`` command fails on its package metadata); ready when ``/v1/models`` answers."""
    port = free_port()
    log = open(log_path, "w+")  # noqa: SIM115 - closed by Server.stop
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", name,
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(python))
    server = Server("vLLM", proc, port, log)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.base}/v1/models", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return _wait(server, ready, timeout)
