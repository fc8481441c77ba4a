"""Quality, memory and speed of a (quantized) model, side by side with a reference.

``evaluate`` measures one configuration: perplexity on held-out text, the mean KL divergence
of its next-token distributions from a reference model's (the usual way to compare
quantizations of the same model — perplexity alone hides where they differ), the bytes of its
weights, and batch-1 decode speed. ``compare`` runs several configurations one after another
(each engine closed before the next starts) against one reference: the table a
quantization study needs, in a notebook or from ``pagedq bench quant``.
"""

from __future__ import annotations

import math
import os
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass

import torch

# Held-out text: standard-library sources that the default calibration set does not use.
EVAL_FILES = ("textwrap.py", "shlex.py", "fractions.py", "difflib.py")


@dataclass
class EvalResult:
    name: str
    perplexity: float
    kl_divergence: float | None  # mean KL(reference || this) per position, nats; None without reference
    weight_bytes: int
    decode_tokens_per_s: float | None
    num_tokens: int  # scored positions

    def as_dict(self) -> dict:
        return asdict(self)


def default_texts(num_texts: int = 4, chars: int = 6000) -> list[str]:
    """Slices of Python standard-library files kept out of the default calibration set."""
    out = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in EVAL_FILES[:num_texts]:
        path = os.path.join(stdlib, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append(f.read()[:chars])
    return out


def _token_lists(llm, texts: list[str], max_len: int) -> list[list[int]]:
    tok = llm.get_tokenizer()
    lists = []
    for t in texts:
        ids = tok.encode(t)[:max_len]
        if len(ids) >= 2:
            lists.append(ids)
    if not lists:
        raise ValueError("evaluation texts must hold at least 2 tokens each; pass longer texts")
    return lists


def reference_distributions(reference, token_lists: list[list[int]]) -> list[torch.Tensor]:
    return reference.next_token_logprobs([{"prompt_token_ids": ids} for ids in token_lists])


def decode_speed(llm, prompt_ids: list[int], tokens: int = 64, runs: int = 3) -> float:
    """Batch-1 decode tokens/s: time of ``tokens + 1`` tokens minus time of 1 (the prefill)."""
    from pagedq import SamplingParams

    def timed(n):
        t0 = time.perf_counter()
        llm.generate(
            [{"prompt_token_ids": prompt_ids}],
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
            use_tqdm=False,
        )
        return time.perf_counter() - t0

    timed(2)  # warm-up: first-use costs (kernel builds, allocator growth) stay out of the figure
    speeds = []
    for _ in range(runs):
        prefill = timed(1)
        speeds.append(tokens / max(timed(tokens + 1) - prefill, 1e-9))
    return statistics.median(speeds)


def evaluate(
    model,
    texts: list[str] | None = None,
    reference=None,
    name: str | None = None,
    max_len: int = 512,
    decode_tokens: int = 64,
    decode_runs: int = 3,
    **llm_kwargs,
) -> EvalResult:
    """Perplexity, KL divergence from ``reference``, weight bytes and decode tokens/s of ``model``.

    ``model`` and ``reference`` are ``LLM`` objects or model folders (opened with
    ``llm_kwargs`` and closed again); ``reference`` may also be the list of distributions a
    previous call computed (``reference_distributions``). ``decode_tokens=0`` skips the speed
    measurement.
    """
    from pagedq import LLM

    owned = isinstance(model, str)
    llm = LLM(model, **llm_kwargs) if owned else model
    try:
        token_lists = _token_lists(llm, texts if texts is not None else default_texts(), max_len)
        ref = reference
        if isinstance(reference, str):
            with LLM(
                reference,
                **{k: v for k, v in llm_kwargs.items() if k not in ("quantization", "kv_cache_dtype")},
            ) as r:
                ref = reference_distributions(r, token_lists)
        elif reference is not None and not isinstance(reference, list):
            ref = reference_distributions(reference, token_lists)
        dists = llm.next_token_logprobs([{"prompt_token_ids": ids} for ids in token_lists])
        nll, kl, count = 0.0, 0.0, 0
        for i, (ids, d) in enumerate(zip(token_lists, dists)):
            targets = torch.tensor(ids[1:])
            nll -= d.gather(1, targets[:, None]).sum().item()
            if ref is not None:
                r = ref[i]
                kl += (r.exp() * (r - d)).sum().item()
            count += len(ids) - 1
        speed = decode_speed(llm, token_lists[0][:16], decode_tokens, decode_runs) if decode_tokens else None
        return EvalResult(
            name=name or (model if owned else "model"),
            perplexity=math.exp(nll / count),
            kl_divergence=kl / count if ref is not None else None,
            weight_bytes=llm.stats()["weight_bytes"],
            decode_tokens_per_s=speed,
            num_tokens=count,
        )
    finally:
        if owned:
            llm.close()


def compare(
    model: str,
    configs: dict[str, dict],
    texts: list[str] | None = None,
    reference: str | None = None,
    max_len: int = 512,
    decode_tokens: int = 64,
    decode_runs: int = 3,
    **common,
) -> list[EvalResult]:
    """Evaluate ``model`` under each of ``configs`` (name -> ``LLM`` keyword arguments, e.g.
    ``{"bf16": {}, "int4": {"quantization": "int4"}}``) against one reference (the first
    config by default); one engine at a time. Returns one :class:`EvalResult` per config."""
    from pagedq import LLM

    names = list(configs)
    if not names:
        raise ValueError("configs is empty; pass e.g. {'bf16': {}, 'int8': {'quantization': 'int8'}}")
    ref_name = reference or names[0]
    if ref_name not in configs:
        raise ValueError(f"reference {ref_name!r} is not one of the configs {names}")
    results: dict[str, EvalResult] = {}
    with LLM(model, **common, **configs[ref_name]) as llm:
        token_lists = _token_lists(llm, texts if texts is not None else default_texts(), max_len)
        ref = reference_distributions(llm, token_lists)
        results[ref_name] = evaluate(llm, texts, ref, ref_name, max_len, decode_tokens, decode_runs)
    for n in names:
        if n != ref_name:
            results[n] = evaluate(
                model, texts, ref, n, max_len, decode_tokens, decode_runs, **common, **configs[n]
            )
    return [results[n] for n in names]
