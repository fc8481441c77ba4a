"""Batch-1 decode on llama.cpp, in llama-cpp-python's own interpreter, and the GGUF it reads.

``python llama_cpp_peer.py MODEL.gguf PROMPT_IDS TOKENS RUNS THREADS`` imports nothing from
pagedq (``pagedq bench decode --llama-cpp-python PATH`` runs it with another virtual
environment's Python) and prints one JSON line: the start-up seconds, and per run the seconds of
the first token (the prefill) and of ``TOKENS`` more, timed as pagedq's ``decode_speed``.

``python llama_cpp_peer.py --convert SRC MODEL_DIR OUT.gguf OUTTYPE`` writes the GGUF with
llama.cpp's own ``convert_hf_to_gguf.py`` from the llama.cpp source tree ``SRC`` (the sdist of
llama-cpp-python carries it under ``vendor/llama.cpp``); it runs in pagedq's interpreter, which
has the torch and transformers the converter imports. The benchmark models' tokenizers are
trained locally, so the converter does not know their pre-tokenizer hash: it is told
``gpt-2``'s byte-level rules. The benchmark feeds token ids, so that choice never touches a
figure.
"""

from __future__ import annotations

import json
import sys
import time


def convert(src: str, model_dir: str, out: str, outtype: str) -> None:
    import os
    import runpy

    sys.path.insert(0, src)
    sys.path.insert(1, os.path.join(src, "gguf-py"))
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # a locally trained byte-level BPE
            return "gpt-2"

    TextModel.get_vocab_base_pre = vocab_base_pre
    sentencepiece = TextModel._set_vocab_sentencepiece

    def set_vocab_sentencepiece(self, *a, **kw):
        # the converter imports sentencepiece before it looks for tokenizer.model; without that
        # file it falls through to the HF tokenizer, as it would with sentencepiece installed
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return sentencepiece(self, *a, **kw)

    TextModel._set_vocab_sentencepiece = set_vocab_sentencepiece
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    runpy.run_path(os.path.join(src, "convert_hf_to_gguf.py"), run_name="__main__")


def decode(gguf: str, prompt: list[int], tokens: int, runs: int, threads: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=gguf,
        n_ctx=max(512, len(prompt) + tokens + 8),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    startup = time.perf_counter() - t0

    def timed(n: int) -> float:
        llm.reset()  # no prompt reuse from the previous run
        t0 = time.perf_counter()
        for got, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):  # greedy, no EOS
            if got == n:
                break
        return time.perf_counter() - t0

    timed(2)  # warm-up, as pagedq's and vLLM's
    first, seconds = [], []
    for _ in range(runs):
        first.append(timed(1))
        seconds.append(timed(tokens + 1) - first[-1])
    return {"startup": startup, "seconds": seconds, "first": first}


def main() -> None:
    if sys.argv[1] == "--convert":
        convert(*sys.argv[2:6])
        return
    gguf, prompt, tokens, runs, threads = sys.argv[1:6]
    res = decode(gguf, json.loads(prompt), int(tokens), int(runs), int(threads))
    print("PAGEDQ_PEER_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
