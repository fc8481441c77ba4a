"""``make gpu-check`` (``python -m pagedq.bench.gpu_check``): what a first GPU must show, in one run.

Needs no network: the models are built locally with random weights. Steps, each under its own
time limit so that the whole run stays within ``--budget`` seconds (8 minutes by default):

1. ``triton``: the Triton kernel tests compiled for the GPU (no interpreter):
   ``tests/test_triton_attention.py`` and ``tests/test_triton_gemm.py``.
2. ``exact``: the engine on CUDA against transformers on CUDA, tiny Llama: greedy tokens equal
   in float32; next-token log-probabilities within 0.1 in bfloat16; int8 and fp8 KV caches
   within 0.05 / 0.15 of the float32 cache.
3. ``quant``: GPTQ (4-bit, act-order) and AWQ checkpoints written by pagedq's quantizers, run on
   the Triton W4A16 GEMM, against their dequantized twins (greedy tokens, float32).
4. ``bench``: ``pagedq bench throughput`` on the ``bench-1b`` shape against HF static batching.

It prints a table and writes it to ``--out``. Without a GPU it prints what it would do and
exits 0 (that path is part of the test suite).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

STEPS = {
    "triton": "Triton kernel tests compiled for the GPU (tests/test_triton_attention.py, test_triton_gemm.py)",
    "exact": "engine on CUDA vs transformers on CUDA: fp32 greedy equal, bf16 logprobs within 0.1, int8/fp8 KV",
    "quant": "GPTQ (act-order) and AWQ checkpoints on the Triton GEMM vs their dequantized twins (fp32 greedy)",
    "bench": "pagedq bench throughput --model bench-1b vs HF static batching",
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpu() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"


def _run(cmd: list[str], timeout: float) -> tuple[bool, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    tail = (p.stdout + p.stderr).strip().splitlines()[-12:]
    return p.returncode == 0, "\n".join(tail)


def check_triton(timeout: float) -> tuple[bool, str]:
    tests = [os.path.join("tests", t) for t in ("test_triton_attention.py", "test_triton_gemm.py")]
    if not all(os.path.isfile(os.path.join(ROOT, t)) for t in tests):
        return False, "the tests are not beside this package (run from a checkout)"
    return _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], timeout)


def _tiny(tmp: str, name: str = "llama") -> str:
    from pagedq.models.build import build_model

    return build_model("tiny", os.path.join(tmp, name), arch="llama")


def check_exact(tmp: str) -> tuple[bool, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedq.llm import LLM
    from pagedq.sampling_params import SamplingParams

    d = _tiny(tmp)
    tok = AutoTokenizer.from_pretrained(d)
    prompts = ["def main(argv):\n    ", "import os\nimport sys\n", "class Foo(object):"]
    # to CUDA with the module's own .cuda() (device_map= would need accelerate); transformers'
    # decorated methods type-check as unbound
    hf: Any = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf = hf.cuda().eval()
    hf.generation_config.eos_token_id = None  # EOS does not stop it, as ignore_eos below
    ref = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        ref.append(out[0, ids.shape[1] :].tolist())
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    notes = []
    with LLM(d, device="cuda", dtype="float32") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        base = llm.next_token_logprobs(prompts[0])[0]
    ok = got == ref
    notes.append(f"fp32 greedy equal to transformers: {ok}")
    for kw, tol in (
        ({"dtype": "bfloat16"}, 0.1),
        ({"kv_cache_dtype": "int8"}, 0.05),
        ({"kv_cache_dtype": "fp8_e4m3"}, 0.15),
    ):
        opts = {"dtype": "float32", "max_num_batched_tokens": 8, **kw}  # chunks read the cache back
        with LLM(d, device="cuda", **opts) as llm:
            diff = (llm.next_token_logprobs(prompts[0])[0].float() - base).abs().max().item()
        notes.append(f"{kw}: max logprob difference {diff:.4f} (<= {tol})")
        ok = ok and diff <= tol
    return ok, "\n".join(notes)


def check_quant(tmp: str) -> tuple[bool, str]:
    import torch

    from pagedq.llm import LLM
    from pagedq.quant import quantize
    from pagedq.sampling_params import SamplingParams

    d = _tiny(tmp, "llama-q")
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["def main(argv):\n    ", "x = 1"]
    ok, notes = True, []
    for method, act_order in (("gptq", True), ("awq", False)):
        out = os.path.join(tmp, f"q-{method}")
        res = quantize(
            d,
            out,
            method=method,
            group_size=32,
            act_order=act_order,
            num_samples=4,
            seq_len=64,
            progress=False,
        )
        with LLM(out, device="cuda", dtype="float32") as llm:
            kind = type(llm.engine.runner.model.layers[0].self_attn.qkv_proj).__name__
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        with LLM(d, device="cuda", dtype="float32") as twin:  # the dense model, dequantized weights
            model = twin.engine.runner.model
            for i, layer in enumerate(model.layers):
                for g in model.linear_groups:
                    names = [f"model.layers.{i}.{g.parent}.{p}" for p in g.linears]
                    w = torch.cat([res.weights[n].dequantize() for n in names])
                    getattr(getattr(layer, g.parent), g.module).set_weight(w)
            ref = [o.outputs[0].token_ids for o in twin.generate(prompts, greedy, use_tqdm=False)]
        same = got == ref
        notes.append(f"{method}: layers {kind}, greedy equal to the dequantized twin: {same}")
        ok = ok and same and kind == "TritonQuantLinear"
    return ok, "\n".join(notes)


def check_bench(timeout: float) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pagedq", "bench", "throughput", "--model", "bench-1b", "--runs", "1"]
    return _run(cmd, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default=os.path.join(ROOT, ".cache", "gpu-check.txt"), help="where the table goes"
    )
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated: " + ", ".join(STEPS))
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    gpu = _gpu()
    if gpu is None:
        print("gpu-check: no CUDA device here; on a GPU this runs, each step under its own time limit:")
        for s in steps:
            print(f"  {s:7s} {STEPS[s]}")
        print(f"and writes the table to {args.out}. Nothing to do: exit 0.")
        return 0
    t0, rows = time.monotonic(), []
    shares = {"triton": 0.35, "exact": 0.15, "quant": 0.15, "bench": 0.35}
    with tempfile.TemporaryDirectory(prefix="pagedq-gpu-check-") as tmp:
        os.environ.setdefault("PAGEDQ_CACHE", os.path.join(tmp, "cache"))
        for s in steps:
            limit = max(30.0, min(shares[s] * args.budget, args.budget - (time.monotonic() - t0)))
            start = time.monotonic()
            try:
                if s == "triton":
                    ok, detail = check_triton(limit)
                elif s == "bench":
                    ok, detail = check_bench(limit)
                else:
                    ok, detail = (check_exact if s == "exact" else check_quant)(tmp)
            except Exception as e:  # a failing step is reported, the others still run
                ok, detail = False, f"{type(e).__name__}: {e}"
            rows.append((s, ok, time.monotonic() - start, detail))
            print(f"[{'ok' if ok else 'FAIL'}] {s} ({rows[-1][2]:.0f} s)\n{detail}\n", flush=True)
    lines = [
        f"gpu-check {time.strftime('%Y-%m-%d %H:%M')} on {gpu}",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {'ok' if ok else 'FAIL'} | {sec:.0f} |" for s, ok, sec, _ in rows]
    lines += [""] + [f"## {s}\n{detail}\n" for s, _, _, detail in rows]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
