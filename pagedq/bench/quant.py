"""``pagedq bench quant``: bf16 against int8 and int4 weights of the same model, in one process.

All variants are loaded at once and measured interleaved, round by round: batch-1 decode
tokens/s (the memory-bound case weight quantization is for), and with ``--throughput`` the
``throughput`` workload. Quality columns (perplexity, KL divergence from bf16) come from
``pagedq.quality`` on held-out standard-library text. ``--crossover`` times one layer's
weight-only kernel (and torch's, on the same weights, when ours runs) against dequantize + bf16
GEMM and the bf16 GEMM over growing token counts: the data behind ``QuantLinear.dequant_min_tokens``.
"""

from __future__ import annotations

import statistics
import time

import torch

from pagedq.llm import LLM

from . import throughput as tp
from . import workloads

VARIANTS = {"bf16": {}, "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"}}


def _crossover(llm: LLM, dtype: torch.dtype) -> None:
    from pagedq.quant.linear import Int4Linear, Int8Linear, NativeQuantLinear, QuantLinear

    model = llm.engine.runner.model
    layer = model.layers[0].mlp.gate_up_proj
    if not isinstance(layer, QuantLinear):
        return
    dense = layer.dequantize(dtype)
    k = layer.in_features
    torch_layer = None  # torch's weight-only kernel on the same weights, beside ours
    if isinstance(layer, NativeQuantLinear):
        w = layer.quant_weight()
        cls = next((c for c in (Int4Linear, Int8Linear) if c.supports(w)), None)
        torch_layer = cls(w, None, dtype) if cls else None

    def t(f, reps=5):
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    name = type(layer).__name__
    print(f"\ncrossover, gate_up_proj [{layer.out_features} x {k}], {name}: ms per call (median of 5)")
    other = f"{type(torch_layer).__name__:>13}" if torch_layer is not None else ""
    print(f"{'tokens':>7}{'kernel':>10}{other}{'dequant+gemm':>14}{'bf16 gemm':>11}")
    for m in (1, 4, 8, 16, 32, 64, 128, 256, 512):
        x = torch.randn(m, k, dtype=dtype)
        xk = layer._prepare(x)
        theirs = (
            f"{t(lambda x=x: torch_layer._kernel(torch_layer._prepare(x))):>13.2f}" if torch_layer else ""
        )
        print(
            f"{m:>7}{t(lambda xk=xk: layer._kernel(xk)):>10.2f}{theirs}"
            f"{t(lambda xk=xk: torch.nn.functional.linear(xk, layer._gemm_weight(dtype))):>14.2f}"
            f"{t(lambda x=x: torch.nn.functional.linear(x, dense)):>11.2f}"
        )


def main(args) -> None:
    from pagedq.models.build import MODEL_SHAPES, ensure_model
    from pagedq.quality import decode_speed, default_texts, evaluate, reference_distributions

    model_dir = ensure_model(args.model) if args.model in MODEL_SHAPES else args.model
    kv = args.kv_cache_memory or "1GiB"
    decode_tokens = args.decode_tokens or 64
    llms = {}
    try:
        for name, extra in VARIANTS.items():
            t0 = time.perf_counter()
            llms[name] = LLM(
                model_dir, dtype=args.dtype, kv_cache_memory=kv, block_size=args.block_size, **extra
            )
            print(f"loaded {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        tok = llms["bf16"].get_tokenizer()
        prompt = workloads.cut_prompt(workloads.corpus_token_ids(tok), tok.bos_token_id, 0, 16)
        speeds: dict[str, list[float]] = {n: [] for n in llms}
        for _ in range(args.runs):  # interleaved rounds
            for name, llm in llms.items():
                speeds[name].append(decode_speed(llm, prompt, decode_tokens, runs=1))
        texts = default_texts()
        ids = [tok.encode(t)[:256] for t in texts]
        ref = reference_distributions(llms["bf16"], ids)
        quality = {
            n: evaluate(llm, texts, ref, name=n, max_len=256, decode_tokens=0) for n, llm in llms.items()
        }
        base = statistics.median(speeds["bf16"])
        print(
            f"\nmodel {model_dir} ({args.dtype}); batch-1 decode of {decode_tokens} tokens, medians of "
            f"{args.runs} interleaved runs; embeddings and LM head stay {args.dtype}"
        )
        print(
            f"{'weights':<8}{'MiB':>9}{'decode tok/s':>14}{'vs bf16':>9}{'perplexity':>12}{'KL vs bf16':>12}   runs"
        )
        for name in llms:
            med = statistics.median(speeds[name])
            q = quality[name]
            runs = " / ".join(f"{s:.1f}" for s in speeds[name])
            print(
                f"{name:<8}{q.weight_bytes / 2**20:>9.0f}{med:>14.1f}{med / base:>8.2f}x"
                f"{q.perplexity:>12.2f}{q.kl_divergence:>12.5f}   {runs}"
            )
        if args.throughput:
            w = workloads.throughput(tok, args.num_requests)
            results: dict[str, list] = {n: [] for n in llms}
            for _ in range(args.runs):
                for name, llm in llms.items():
                    results[name].append(tp.run_pagedq(llm, w).output_tps)
            base = statistics.median(results["bf16"])
            print(f"\nthroughput workload ({len(w.prompts)} requests), output tok/s, medians of {args.runs}")
            for name in llms:
                med = statistics.median(results[name])
                runs = " / ".join(f"{s:.1f}" for s in results[name])
                print(f"{name:<8}{med:>10.1f}{med / base:>8.2f}x   {runs}")
        if args.crossover:
            for name in ("int8", "int4"):
                _crossover(llms[name], llms[name].engine.dtype)
    finally:
        for llm in llms.values():
            llm.close()
