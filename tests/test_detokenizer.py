"""The incremental detokenizer's decode: the tokenizer's own ``decode``, without its overhead."""

import random

import pytest
from transformers import AutoTokenizer

from pagedq import detokenizer


class _DecodeOnly:
    """A tokenizer with nothing but ``decode`` (a slow tokenizer, a custom one)."""

    def __init__(self, inner):
        self.inner = inner

    def decode(self, ids, skip_special_tokens=False):
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("variant", ["fast", "clean_up_spaces", "decode_only"])
def test_the_detokenizers_decode_returns_what_the_tokenizers_decode_returns(tokenizer, tmp_path, variant):
    """Every path of ``decoder`` (the fast tokenizer's backend; its ``_decode`` where it cleans up
    spaces; plain ``decode`` for anything else) gives ``tokenizer.decode``'s text to the
    character, special tokens kept or skipped, for windows that cut multi-byte characters."""
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, clean_up_tokenization_spaces=variant == "clean_up_spaces")
    if variant == "decode_only":
        tok = _DecodeOnly(tok)
    decode = detokenizer.decoder(tok)
    specials = [
        i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None
    ]
    assert specials
    text = "déjà vu — naïve café, 東京 ✓ (x + y) . , ! def f():\n\treturn 1\n"
    rng = random.Random(0)
    base = tokenizer.encode(text, add_special_tokens=False)
    for _ in range(300):
        a = rng.randrange(len(base))
        ids = base[a : a + rng.randrange(1, 9)]
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        if rng.random() < 0.3:
            ids.append(rng.randrange(len(tokenizer)))
        for skip in (False, True):
            assert decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert decode([], True) == tok.decode([], skip_special_tokens=True)
