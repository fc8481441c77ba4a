"""Quality, memory and speed of a (quantized) model, side by side with a reference.

A study tool above the engine (it opens ``LLM`` objects), so it lives here and not in
``pagedq.quant``, which the engine's model loader depends on.

``evaluate`` measures one configuration: perplexity on held-out text, the mean KL divergence
of its next-token distributions from a reference model's (the usual way to compare
quantizations of the same model — perplexity alone hides where they differ), the bytes of its
weights, and batch-1 decode speed. ``compare`` runs several configurations one after another
(each engine closed before the next starts) against one reference: the table a
quantization study needs, in a notebook or from ``pagedq bench quant``.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .llm import LLM
from .sampling_params import SamplingParams

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


SCHEMES: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp16": {"dtype": "float16"},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "int4": {"dtype": "bfloat16", "quantization": "int4"},
    "gptq4": {"dtype": "bfloat16", "quantize": dict(method="gptq", bits=4)},
    "gptq8": {"dtype": "bfloat16", "quantize": dict(method="gptq", bits=8, sym=True)},
    "awq4": {"dtype": "bfloat16", "quantize": dict(method="awq", bits=4)},
    "rtn4": {"dtype": "bfloat16", "quantize": dict(method="rtn", bits=4)},
    # a KV-cache scheme only shows when prompts are scored in chunks that read the cache back
    "kv-int8": {"dtype": "bfloat16", "kv_cache_dtype": "int8", "max_num_batched_tokens": 32},
    "kv-fp8": {"dtype": "bfloat16", "kv_cache_dtype": "fp8_e4m3", "max_num_batched_tokens": 32},
}


def _scheme_config(model: str, name: str, group_size: int) -> dict:
    """``LLM`` keyword arguments of a scheme name; GPTQ/AWQ/RTN checkpoints are written once
    (with pagedq's quantizers) and cached under ``$PAGEDQ_CACHE/quantized``."""
    from .models.build import cache_dir

    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; choose from {sorted(SCHEMES)}")
    cfg: dict[str, Any] = dict(SCHEMES[name])
    q = cfg.pop("quantize", None)
    if q is not None:
        from .engine import resolve_model_dir
        from .quant.quantize import quantize

        src = resolve_model_dir(model)
        tag = hashlib.sha256(os.path.realpath(src).encode()).hexdigest()[:10]
        out = os.path.join(cache_dir(), "quantized", f"{os.path.basename(src)}-{tag}-{name}-g{group_size}")
        if not os.path.isfile(os.path.join(out, "model.safetensors")):
            quantize(src, out, group_size=group_size, progress=False, **q)
        cfg["model"] = out
    return cfg


@dataclass
class Comparison:
    """Rows of :func:`compare`, shown as a table in a notebook; :meth:`plot` draws them."""

    rows: list[EvalResult]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def _cells(self, r: EvalResult) -> list[str]:
        kl = "-" if r.kl_divergence is None else f"{r.kl_divergence:.5f}"
        tps = "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
        return [r.name, f"{r.perplexity:.3f}", kl, f"{r.weight_bytes / 2**20:.2f}", tps]

    _HEAD = ("scheme", "perplexity", "KL vs reference", "weights MiB", "decode tok/s")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in self._HEAD)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in self._cells(r)) + "</tr>" for r in self.rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def __repr__(self) -> str:
        lines = [self._HEAD] + [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self._HEAD))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)

    def plot(self):
        """A matplotlib figure: perplexity, KL divergence, weight memory and speed per scheme."""
        import matplotlib.pyplot as plt

        names = [r.name for r in self.rows]
        panels = [
            ("perplexity", [r.perplexity for r in self.rows]),
            ("KL vs reference (nats)", [r.kl_divergence or 0.0 for r in self.rows]),
            ("weights (MiB)", [r.weight_bytes / 2**20 for r in self.rows]),
            ("decode tok/s", [r.decode_tokens_per_s or 0.0 for r in self.rows]),
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
        for ax, (title, values) in zip(axes, panels):
            ax.bar(names, values, color="#4c72b0")
            ax.set_title(title, fontsize=10)
            ax.tick_params(axis="x", rotation=45, labelsize=8)
        fig.tight_layout()
        return fig


def compare(
    model: str,
    configs: dict[str, dict] | None = None,
    texts: list[str] | None = None,
    reference: str | None = None,
    max_len: int = 512,
    decode_tokens: int = 64,
    decode_runs: int = 3,
    schemes: list[str] | None = None,
    group_size: int = 128,
    plot: bool = False,
    **common,
) -> Comparison:
    """Evaluate ``model`` under several configurations against one reference (the first by
    default), one engine at a time.

    ``schemes`` names them (``bf16``, ``int8``, ``int4``, ``gptq4``, ``gptq8``, ``awq4``,
    ``rtn4``, ``kv-int8``, ``kv-fp8``, ``fp32``; GPTQ/AWQ/RTN checkpoints are made with
    pagedq's quantizers and cached); ``configs`` gives them as ``name -> LLM keyword
    arguments`` instead. ``plot=True`` also draws the figure (in a notebook, inline).
    """
    if schemes is not None:
        configs = {name: _scheme_config(model, name, group_size) for name in schemes}
    if not configs:
        raise ValueError("pass schemes=[...] (e.g. ['bf16', 'int8', 'int4']) or configs={name: LLM kwargs}")
    names = list(configs)
    ref_name = reference or names[0]
    if ref_name not in configs:
        raise ValueError(f"reference {ref_name!r} is not one of {names}")

    def open_llm(name):
        cfg = dict(common, **configs[name])
        return LLM(cfg.pop("model", model), **cfg)

    results: dict[str, EvalResult] = {}
    with open_llm(ref_name) as llm:
        token_lists = _token_lists(llm, texts if texts is not None else default_texts(), max_len)
        ref = reference_distributions(llm, token_lists)
        results[ref_name] = evaluate(llm, texts, ref, ref_name, max_len, decode_tokens, decode_runs)
    for n in names:
        if n != ref_name:
            with open_llm(n) as llm:
                results[n] = evaluate(llm, texts, ref, n, max_len, decode_tokens, decode_runs)
    table = Comparison([results[n] for n in names])
    if plot:
        table.plot()
    return table
