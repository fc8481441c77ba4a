"""Shared fixtures: tiny random models of every supported family, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the switch must be set before
# triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib

from pagedq.models.build import build_model, build_tokenizer


def _isolated_kernelspec() -> str:
    """A ``python3`` kernelspec of the interpreter under test, in a temporary Jupyter path that
    comes first for this process and every server, notebook and kernel it starts: a user-wide
    ``python3`` kernelspec that points at another environment cannot hijack the tests."""
    import atexit
    import json
    import shutil
    import sys
    import tempfile

    root = tempfile.mkdtemp(prefix="pagedq-jupyter-path-")
    atexit.register(shutil.rmtree, root, True)
    spec_dir = os.path.join(root, "kernels", "python3")
    os.makedirs(spec_dir)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pagedq tests)",
        "language": "python",
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (root, os.environ.get("JUPYTER_PATH")) if p)
    return root


KERNELSPEC_PATH = _isolated_kernelspec()

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "granite"]
# config fields every tiny model of an architecture gets unless a test overrides them: Granite
# 3's multipliers (its attention multiplier is 1/head_dim), so that they are exercised
ARCH_DEFAULTS = {
    "granite": dict(
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / 16, logits_scaling=8.0
    ),
}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(2048, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, tokenizer):
    """``model_factory(arch, **config_overrides)`` -> folder of a tiny model (cached per arguments)."""
    built: dict = {}

    def make(arch: str = "llama", **overrides) -> str:
        overrides = {**ARCH_DEFAULTS.get(arch, {}), **overrides}
        key = (arch, repr(sorted(overrides.items())))
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            built[key] = build_model("tiny", out, arch=arch, tokenizer=tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory):
    return model_factory("llama")


PROMPTS = [
    "def main(argv):\n    ",
    "import os\nimport sys\n",
    "class Foo(object):",
    "x = 1",
    "for i in range(10):\n    print(i)\n    if i % 2 == 0:\n        continue\n",
    "# a comment about parsing arguments from the command line, with a long tail of words",
    "return",
    "while True:\n    if",
    '"""Docstring of a module that does a number of things."""\n\nfrom __future__ import annotations\n',
]


def hf_greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers generate(do_sample=False), one prompt at a time, EOS not stopping it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = hf.generate(
                ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
            )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def run_checked(llm, prompts, params) -> list:
    """Drive the engine step by step, checking the block manager's invariants after every step."""
    engine = llm.engine
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
    finals = {}
    engine.block_manager.check()
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.block_manager.check()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return [finals[i] for i in ids]


def wait_for_jupyter(url: str, token: str, proc, read_log, timeout: float = 60) -> None:
    """Poll a Jupyter server's ``/api/status`` until it answers; if it exits or does not answer
    within ``timeout`` s, kill it and raise with the tail of its log (``read_log()``)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the Jupyter server did not start:\n" + read_log()[-3000:]) from None
            time.sleep(0.3)


def run_on_avx2_build(tmp_path, test_file: str, select: str) -> str:
    """Run ``pytest -k select`` on one of these test files in a fresh process whose native kernels
    are compiled without AVX-512 (``PAGEDQ_CPU_ISA=avx2``, its own cache under ``tmp_path``), so
    that a CPU with AVX-512 tests the AVX2 paths too; returns pytest's output, or fails the caller."""
    import subprocess
    import sys

    env = {**os.environ, "PAGEDQ_CPU_ISA": "avx2", "PAGEDQ_CACHE": str(tmp_path)}
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, test_file), "-k", select],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(here),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
    return run.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not reaped
    except OSError:
        return False


def engine_pids(server_pid: int) -> list[int]:
    """The live engine processes of a server: its multiprocessing children that are not
    multiprocessing's resource tracker."""
    out = []
    for pid in child_pids(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmd and "resource_tracker" not in cmd and pid_alive(pid):
            out.append(pid)
    return out


class ServeProcess:
    """``pagedq serve`` in a subprocess (server + its engine process), on a free port of loopback.

    ``start()`` waits for the line that says it serves; ``engine_pid()`` is the engine process;
    ``stop()`` sends SIGTERM and waits (then SIGKILL); the log is kept in ``log``.
    """

    def __init__(self, *args: str, model: str = "pagedq-tiny", env: dict | None = None, tmp=None):
        import tempfile

        self.port = free_port()
        self.args = [model, "--port", str(self.port), "--dtype", "float32", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # the server's log for the process's whole life; closed by stop()
        self.logfile = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False, dir=tmp)  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 120) -> ServeProcess:
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedq", "serve", *self.args],
            stdout=self.logfile, stderr=subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        deadline = time.time() + timeout
        while "pagedq: serving" not in self.log:
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise RuntimeError("pagedq serve did not start:\n" + self.log[-3000:])
            time.sleep(0.1)
        return self

    @property
    def log(self) -> str:
        with open(self.logfile.name) as f:
            return f.read()

    def engine_pid(self, timeout: float = 60) -> int:
        """The engine process's pid, once it is ready."""
        import json
        import time
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=5) as r:
                    if json.load(r)["status"] == "ready":
                        kids = engine_pids(self.proc.pid)
                        if kids:
                            return kids[-1]
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the engine did not become ready:\n" + self.log[-3000:])

    def stop(self, timeout: float = 60) -> int:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kids = child_pids(self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)
            for pid in kids:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)


class AppThread:
    """A tornado app on a free port of loopback, its event loop on a thread of this process."""

    def __init__(self, app):
        import asyncio
        import threading

        import tornado.httpserver
        import tornado.netutil

        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            socks = tornado.netutil.bind_sockets(0, "127.0.0.1")
            self.port = socks[0].getsockname()[1]
            tornado.httpserver.HTTPServer(app).add_sockets(socks)
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def count_stack_calls(monkeypatch) -> list[int]:
    """The rows of every ``native.decoder_layers`` call (the native decoder stack) from here on,
    the calls themselves unchanged."""
    from pagedq.kernels import native

    calls: list[int] = []
    stack = native.decoder_layers
    monkeypatch.setattr(native, "decoder_layers", lambda *a: (calls.append(a[1].shape[0]), stack(*a)))
    return calls
