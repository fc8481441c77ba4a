"""The workloads of ``docs/benchmarks.md``, built the same way for every engine that runs them.

Prompts are token ids cut deterministically from the tokenized text of Python's
``argparse.py``, each starting with BOS, so that pagedq and its peers see identical inputs.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def corpus_token_ids(tokenizer) -> list[int]:
    path = os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return tokenizer.encode(text, add_special_tokens=False)


def cut_prompt(corpus: list[int], bos: int | None, i: int, length: int) -> list[int]:
    """Prompt ``i`` of ``length`` tokens: BOS, then a window of the corpus at a fixed offset."""
    body = length - 1 if bos is not None else length
    offset = (i * 997) % (len(corpus) - body)
    return ([bos] if bos is not None else []) + corpus[offset : offset + body]


def throughput(tokenizer, num_requests: int = 64, window_shift: int = 0) -> Workload:
    """64 requests at t=0; prompt ``16 + (i*37) % 497`` tokens; output ``32 + (i*53) % 225`` tokens.

    ``window_shift`` cuts prompt ``i`` from the corpus window of ``i + window_shift`` (lengths and
    outputs unchanged): a serving benchmark gives each pass over one server fresh text, so no
    pass is served from the prefix cache an earlier pass filled."""
    corpus = corpus_token_ids(tokenizer)
    bos = tokenizer.bos_token_id
    prompts = [cut_prompt(corpus, bos, i + window_shift, 16 + (i * 37) % 497) for i in range(num_requests)]
    outputs = [32 + (i * 53) % 225 for i in range(num_requests)]
    return Workload("throughput", prompts, outputs)


def parallel(tokenizer, num_requests: int = 32) -> Workload:
    """32 requests, prompts as ``throughput``, 128 output tokens each, sampled n=4 (seed i)."""
    base = throughput(tokenizer, num_requests)
    return Workload("parallel", base.prompts, [128] * num_requests)


def beam(tokenizer, num_requests: int = 16) -> Workload:
    """16 requests, prompts as ``throughput``, up to 64 output tokens, beam width 4 (EOS stops a beam)."""
    base = throughput(tokenizer, num_requests)
    return Workload("beam", base.prompts, [64] * num_requests)


def prefix(tokenizer, num_requests: int = 64, prefix_len: int = 512) -> Workload:
    """64 requests: one shared 512-token prefix plus a distinct 16-64-token suffix; 64 output tokens."""
    corpus = corpus_token_ids(tokenizer)
    shared = cut_prompt(corpus, tokenizer.bos_token_id, 0, prefix_len)
    prompts = []
    for i in range(num_requests):
        n = 16 + (i * 37) % 49
        offset = prefix_len + (i * 1999) % (len(corpus) - prefix_len - n)
        prompts.append(shared + corpus[offset : offset + n])
    return Workload("prefix", prompts, [64] * num_requests)
