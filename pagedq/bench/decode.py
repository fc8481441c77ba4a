"""``pagedq bench decode``: batch-1 decode tokens/s of pagedq beside its peers, back to back.

One 16-token prompt of the workload corpus, ``--decode-tokens`` (128) greedy tokens with EOS
ignored. Every engine is timed the same way: a warm-up request, then per run the seconds of the
first token (the prefill) and of ``tokens + 1`` tokens; decode tokens/s is ``tokens`` over the
difference. pagedq and HF transformers run interleaved in this process; vLLM's CPU build
(``--vllm-python``) and llama.cpp (``--llama-cpp-python``, through llama-cpp-python) run after
them in their own virtual environments, each for the same number of runs, with as many threads
as pagedq's torch. llama.cpp reads the model as GGUF of the benchmark's dtype, written once by
llama.cpp's own converter (``--llama-cpp-src``) or given (``--gguf``). The run ends with the
floor of batch-1 decode on this machine (weights and KV read at the measured bandwidth).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

from pagedq.llm import LLM

from . import roofline, workloads

GGUF_TYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def hf_decode_speed(model, prompt: list[int], tokens: int) -> float:
    """HF ``generate()`` at batch 1, timed as :func:`pagedq.quality.decode_speed`."""
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )
        return time.perf_counter() - t0

    timed(2)
    prefill = timed(1)
    return tokens / max(timed(tokens + 1) - prefill, 1e-9)


def gguf_for(model_dir: str, dtype: str, src: str | None) -> str:
    """The model as GGUF of ``dtype``, converted once into ``MODEL_DIR/gguf/`` by llama.cpp's own
    ``convert_hf_to_gguf.py`` from the llama.cpp source tree ``src``."""
    outtype = GGUF_TYPES[dtype]
    out = os.path.join(model_dir, "gguf", f"{outtype}.gguf")
    if os.path.isfile(out):
        return out
    if src is None:
        raise ValueError(
            f"--llama-cpp-python needs the model as GGUF: pass --gguf FILE, or --llama-cpp-src DIR (a llama.cpp "
            f"source tree with convert_hf_to_gguf.py, e.g. the llama-cpp-python sdist's vendor/llama.cpp) to "
            f"write {out}"
        )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_peer.py")
    tmp = out + ".part"
    proc = subprocess.run(
        [sys.executable, script, "--convert", src, model_dir, tmp, outtype], capture_output=True, text=True
    )
    if proc.returncode != 0 or not os.path.isfile(tmp):
        raise RuntimeError(f"the GGUF conversion failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def check_args(args) -> None:
    """Paths of the peers checked before anything loads, each error naming its option."""
    if args.decode_tokens is not None and args.decode_tokens < 1:
        raise ValueError(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
    for opt in ("vllm_python", "llama_cpp_python"):
        path = getattr(args, opt)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ValueError(f"--{opt.replace('_', '-')} must be an executable Python, got {path!r}")
    if args.gguf is not None and not os.path.isfile(args.gguf):
        raise ValueError(f"--gguf must be a GGUF file, got {args.gguf!r}")
    src = args.llama_cpp_src
    if src is not None and not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        raise ValueError(
            f"--llama-cpp-src must be a llama.cpp source tree with convert_hf_to_gguf.py, got {src!r}"
        )


def main(args) -> None:
    from transformers import AutoModelForCausalLM

    from pagedq.models.build import MODEL_SHAPES, ensure_model

    from .servers import peer_result
    from .throughput import run_vllm

    check_args(args)
    tokens = args.decode_tokens or 128
    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    gguf = None
    if args.llama_cpp_python:  # converted first: a failure costs no measuring
        gguf = args.gguf or gguf_for(model_dir, args.dtype, args.llama_cpp_src)
    llm = LLM(
        model_dir,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory or "1GiB",
        block_size=args.block_size,
    )
    tok = llm.get_tokenizer()
    prompt = workloads.cut_prompt(workloads.corpus_token_ids(tok), tok.bos_token_id, 0, 16)
    threads = torch.get_num_threads()
    print(
        f"model {model_dir} ({args.dtype}); batch-1 decode: {len(prompt)}-token prompt, {tokens} tokens after "
        f"the first, greedy; {threads} threads"
    )
    hf = None if args.no_baseline else AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    from pagedq.quality import decode_speed

    speeds: dict[str, list[float]] = {"pagedq": []}
    if hf is not None:
        speeds["hf transformers"] = []
    for r in range(args.runs):
        speeds["pagedq"].append(decode_speed(llm, prompt, tokens, runs=1))
        line = f"  run {r + 1}: pagedq {speeds['pagedq'][-1]:6.1f} tok/s"
        if hf is not None:
            speeds["hf transformers"].append(hf_decode_speed(hf, prompt, tokens))
            line += f" | hf {speeds['hf transformers'][-1]:6.1f}"
        print(line, flush=True)
    model_config = llm.engine.model_config
    llm.close()
    del hf
    failed: dict[str, str] = {}  # a peer that cannot run here is reported, not fatal to the others
    if args.vllm_python:
        print(f"vLLM ({args.vllm_python}): starting, then {args.runs} runs ...", flush=True)
        w = workloads.Workload("decode", [prompt], [tokens])
        try:
            res = run_vllm(args.vllm_python, model_dir, w, args.runs, args.dtype, mode="decode")
            speeds["vllm-cpu"] = [tokens / s for s in res["seconds"]]
            print(f"vLLM start-up {res['startup']:.1f} s", flush=True)
        except RuntimeError as e:
            failed["vllm-cpu"] = str(e)
    if args.llama_cpp_python and gguf is not None:
        print(f"llama.cpp ({args.llama_cpp_python}, {gguf}): {args.runs} runs ...", flush=True)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_peer.py")
        cmd = [args.llama_cpp_python, script, gguf, str(prompt), str(tokens), str(args.runs), str(threads)]
        try:
            speeds["llama.cpp"] = [tokens / s for s in peer_result(cmd, "llama.cpp")["seconds"]]
        except RuntimeError as e:
            failed["llama.cpp"] = str(e)
    for name, err in failed.items():
        print(f"{name} FAILED, no figure: {err}", flush=True)
    report(speeds)
    machine = roofline.measure_machine(dtype)
    floor = roofline.decode_floor_tps(model_config, len(prompt), tokens, machine)
    ours = statistics.median(speeds["pagedq"])
    print(
        f"roofline: read bandwidth {machine.read_bytes / 1e9:.1f} GB/s (measured now) -> batch-1 floor "
        f"{floor:.0f} tok/s in {args.dtype} weights; pagedq reaches {100 * ours / floor:.0f}% of it"
    )


def report(speeds: dict[str, list[float]]) -> None:
    ours = statistics.median(speeds["pagedq"])
    print(f"\nbatch-1 decode tok/s, medians of {len(speeds['pagedq'])} runs")
    print(f"{'engine':<18}{'tok/s':>9}{'pagedq /':>10}   runs")
    for name, runs in speeds.items():
        med = statistics.median(runs)
        print(f"{name:<18}{med:>9.1f} {ours / med:>8.2f}x   " + " / ".join(f"{s:.1f}" for s in runs))
