"""``pagedq-tiny``: the small trained model that ships inside the package.

A 4-layer Llama (hidden 256, intermediate 768 — multiples of 128, so every quantization scheme
applies; 4 heads of 64, 2 KV heads; tied embeddings; about 4 M parameters) trained on the
Python standard library's own sources (PSF License 2.0, which permits redistribution; present
on every machine that has Python, so training needs no download). Its byte-level BPE tokenizer
(4096 tokens) is trained on the same text. It writes text that reads like Python code, and it
gives quantization experiments a real perplexity to compare.

``LLM("pagedq-tiny")`` and ``%pagedq load pagedq-tiny`` find it; :func:`train` is the recipe
that made it (``python -m pagedq.models.default OUT_DIR``), and the model card next to the
weights records the corpus, the recipe and the losses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from typing import Any

NAME = "pagedq-tiny"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", NAME)

CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
VOCAB = 4096
RECIPE: dict[str, Any] = dict(
    seq_len=256, batch=16, lr=3e-3, warmup=60, weight_decay=0.1, seed=0, holdout_every=20
)


def path() -> str:
    """The folder of the shipped model; raises if this installation lacks it."""
    if not os.path.isfile(os.path.join(PACKAGE_DIR, "config.json")):
        raise ValueError(
            f"the default model {NAME!r} is not in this installation ({PACKAGE_DIR}); "
            "reinstall pagedq, or train it with: python -m pagedq.models.default OUT_DIR"
        )
    return PACKAGE_DIR


def corpus_files() -> list[str]:
    """Every ``*.py`` of the standard library except tests and site-packages, sorted."""
    import glob
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = ("site-packages", "dist-packages", os.sep + "test", os.sep + "tests", "idle_test", "lib2to3")
    files = [
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if not any(s in f for s in skip)
    ]
    return sorted(files)


def _corpus(tokenizer) -> tuple[list[int], list[int], list[str]]:
    """Token ids of the standard library's sources: training files and every 20th file held out."""
    files = corpus_files()
    train: list[int] = []
    held: list[int] = []
    for i, f in enumerate(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids = [*tokenizer.encode(fh.read(), add_special_tokens=False), tokenizer.eos_token_id]
        (held if i % RECIPE["holdout_every"] == 0 else train).extend(ids)
    return train, held, files


def train(out_dir: str, minutes: float = 12.0, threads: int | None = None) -> dict:
    """Train ``pagedq-tiny`` for ``minutes`` of wall time on CPU and save it to ``out_dir``."""
    import torch
    import transformers

    from .build import CHAT_TEMPLATE, build_tokenizer

    torch.manual_seed(RECIPE["seed"])
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(VOCAB, out_dir)
    tok.chat_template = CHAT_TEMPLATE
    train_ids, held_ids, files = _corpus(tok)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **CONFIG,
    )
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=RECIPE["lr"], betas=(0.9, 0.95), weight_decay=RECIPE["weight_decay"]
    )
    data = torch.tensor(train_ids)
    held = torch.tensor(held_ids)
    L, B = RECIPE["seq_len"], RECIPE["batch"]
    g = torch.Generator().manual_seed(RECIPE["seed"])

    t0, step, log = time.perf_counter(), 0, []
    budget = minutes * 60
    est_steps = None
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed > budget:
            break
        if step == 20:
            est_steps = int(budget / (elapsed / 20))
        for group in opt.param_groups:
            group["lr"] = _learning_rate(step, est_steps)
        x = _batch(data, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            entry = {"step": step, "seconds": round(elapsed, 1), "train_loss": round(loss.item(), 4)}
            if step % 500 == 0:
                entry["heldout_loss"] = round(_held_loss(model, held), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        step += 1
    final = {"steps": step, "tokens": step * B * L, "heldout_loss": round(_held_loss(model, held, 32), 4)}
    model = model.bfloat16()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    card = _model_card(n_params, files, len(train_ids), len(held_ids), minutes, final, log)
    with open(os.path.join(out_dir, "model_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    print(json.dumps(final))
    return card


def _batch(src, g):
    import torch

    starts = torch.randint(0, src.numel() - RECIPE["seq_len"] - 1, (RECIPE["batch"],), generator=g)
    return torch.stack([src[s : s + RECIPE["seq_len"]] for s in starts])


def _held_loss(model, held, n: int = 8) -> float:
    import torch

    seq_len = RECIPE["seq_len"]
    model.eval()
    tot = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(n):
            s = (i * (held.numel() - seq_len - 1)) // n
            x = held[s : s + seq_len][None]
            tot += model(x, labels=x).loss.float().item()
    model.train()
    return tot / n


def _learning_rate(step: int, est_steps: int | None) -> float:
    """Linear warm-up, then (once the run's length is estimated) cosine decay to 10%."""
    lr = RECIPE["lr"] * min(1.0, (step + 1) / RECIPE["warmup"])
    if est_steps:
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / est_steps)))
    return lr


def _model_card(n_params, files, train_tokens, heldout_tokens, minutes, final, log) -> dict:
    import torch
    import transformers

    corpus_hash = hashlib.sha256("\n".join(os.path.relpath(f) for f in files).encode()).hexdigest()[:16]
    return {
        "name": NAME,
        "parameters": n_params,
        "config": CONFIG,
        "vocab_size": VOCAB,
        "corpus": {
            "what": "Python standard library sources (every *.py under sysconfig stdlib except tests, lib2to3, site-packages)",
            "python": platform.python_version(),
            "files": len(files),
            "train_tokens": train_tokens,
            "heldout_tokens": heldout_tokens,
            "heldout": f"every {RECIPE['holdout_every']}th file",
            "file_list_sha256_16": corpus_hash,
            "license": "PSF License Agreement for Python (PSF-2.0), which permits redistribution of derived works",
        },
        "recipe": dict(
            RECIPE, minutes=minutes, optimizer="AdamW(0.9, 0.95)", precision="bf16 autocast on CPU"
        ),
        "result": final,
        "log": log,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    train(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 12.0)
