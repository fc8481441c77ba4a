"""Build the random-weight benchmark models and their tokenizer locally (nothing is downloaded).

The models are those of ``docs/benchmarks.md``: built with transformers from a config with seed 0 and
saved as safetensors, with a byte-level BPE tokenizer trained with ``tokenizers`` on Python's
standard-library sources. Tests, benchmarks and users all build them through here, and
:func:`ensure_model` caches them so each is built once per machine.
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# name -> (architecture, config fields, tokenizer vocab size)
MODEL_SHAPES: dict[str, tuple[str, dict, int]] = {
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        2048,
    ),
    "bench": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
        ),
        49152,
    ),
    "bench-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            max_position_embeddings=8192,
        ),
        128256,
    ),
}

_BF16_MODELS = {"bench", "bench-1b"}


def cache_dir() -> str:
    return os.environ.get("PAGEDQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagedq"))


def stdlib_files() -> list[str]:
    """Python's standard-library sources, sorted: the tokenizer's training corpus."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise RuntimeError(f"no Python standard-library sources found under {root}")
    return files


def build_tokenizer(vocab_size: int, out_dir: str):
    """Train a byte-level BPE tokenizer and save it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = stdlib_files()
    if vocab_size < 8000:
        files = files[:: max(1, len(files) // 60)]  # a small vocabulary needs little text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(
    name: str, out_dir: str, arch: str | None = None, seed: int = 0, tokenizer=None, **overrides
) -> str:
    """Build model ``name`` (a key of ``MODEL_SHAPES``) with random weights into ``out_dir``.

    ``arch`` switches the family (a ``hf_model_type`` of the registry: ``llama``, ``mistral``,
    ``qwen2``, ``qwen3``, ``granite``) at the same
    shape; ``overrides`` change config fields (e.g. ``rope_scaling``); ``tokenizer`` reuses an
    already trained tokenizer instead of training one. Returns ``out_dir``.
    """
    import torch
    import transformers

    from .registry import by_model_type

    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_SHAPES)}")
    default_arch, shape, vocab = MODEL_SHAPES[name]
    arch = arch or default_arch
    ours = by_model_type(arch)  # transformers' classes of the same architecture build it
    hf_model = ours.__name__
    hf_config = hf_model.replace("ForCausalLM", "Config")
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is None:
        tok = build_tokenizer(vocab, out_dir)
    else:
        tok = tokenizer
        tok.save_pretrained(out_dir)
    cfg_cls, model_cls = getattr(transformers, hf_config), getattr(transformers, hf_model)
    fields = dict(shape)
    fields.update(
        vocab_size=max(len(tok), vocab),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # transformers' defaults that a small random model must not keep (Mistral's 4096-token
    # window, Qwen3's head_dim of 128)
    if getattr(cfg_cls(), "sliding_window", None) is not None:
        fields.setdefault("sliding_window", None)
    fields.setdefault("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    fields.update(overrides)
    config = cfg_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls(config)
    if name in _BF16_MODELS:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    logger.info("built %s (%s) in %s", name, arch, out_dir)
    return out_dir


def ensure_model(name: str, arch: str | None = None) -> str:
    """Path of model ``name``, built into the cache on first use."""
    tag = name if arch is None else f"{name}-{arch}"
    path = os.path.join(cache_dir(), "models", tag)
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = path + f".tmp{os.getpid()}"
        build_model(name, tmp, arch=arch)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(tmp, path)
    return path
