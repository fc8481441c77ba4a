"""Shared fixtures: tiny random models of every supported family, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the switch must be set before
# triton decorates any kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pagedq.models.build import build_model, build_tokenizer

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(2048, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory, tokenizer):
    """``model_factory(arch, **config_overrides)`` -> folder of a tiny model (cached per arguments)."""
    built: dict = {}

    def make(arch: str = "llama", **overrides) -> str:
        key = (arch, repr(sorted(overrides.items())))
        if key not in built:
            out = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            built[key] = build_model("tiny", out, arch=arch, tokenizer=tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory):
    return model_factory("llama")


PROMPTS = [
    "def main(argv):\n    ",
    "import os\nimport sys\n",
    "class Foo(object):",
    "x = 1",
    "for i in range(10):\n    print(i)\n    if i % 2 == 0:\n        continue\n",
    "# a comment about parsing arguments from the command line, with a long tail of words",
    "return",
    "while True:\n    if",
    '"""Docstring of a module that does a number of things."""\n\nfrom __future__ import annotations\n',
]


def hf_greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Reference: transformers generate(do_sample=False), one prompt at a time, EOS not stopping it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = hf.generate(
                ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id
            )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def run_checked(llm, prompts, params) -> list:
    """Drive the engine step by step, checking the block manager's invariants after every step."""
    engine = llm.engine
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
    finals = {}
    engine.block_manager.check()
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        engine.block_manager.check()
    assert engine.block_manager.num_free_blocks == engine.num_kv_blocks
    return [finals[i] for i in ids]


def wait_for_jupyter(url: str, token: str, proc, read_log, timeout: float = 60) -> None:
    """Poll a Jupyter server's ``/api/status`` until it answers; if it exits or does not answer
    within ``timeout`` s, kill it and raise with the tail of its log (``read_log()``)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the Jupyter server did not start:\n" + read_log()[-3000:]) from None
            time.sleep(0.3)
