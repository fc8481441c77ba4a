"""Incremental detokenization: the text of each new token, without decoding the whole sequence.

Decoding a token alone is wrong for byte-level and sentencepiece vocabularies (a character can
span tokens, a leading space depends on the token before). So each step decodes a short window
``token_ids[prefix_offset:]`` and subtracts the text of ``token_ids[prefix_offset:read_offset]``;
the window starts a few prompt tokens back so the first output token gets its context. Text
ending in U+FFFD is an unfinished multi-byte character and is held back until it completes.
"""

from __future__ import annotations

from collections.abc import Callable

from .sequence import Sequence

_CONTEXT_TOKENS = 5

Decode = Callable[[list[int], bool], str]  # (token ids, skip special tokens) -> text


def decoder(tokenizer) -> Decode:
    """``tokenizer.decode`` for a list of ints, as cheap as the tokenizer allows.

    A step decodes two short windows per sequence, and ``decode`` spends more time converting
    its input (``to_py_obj`` walks the list) and dispatching than the Rust tokenizer spends
    decoding: 17 us a call, 2.6 of them in Rust, ~5 ms a step at 116 sequences. A fast
    tokenizer that does not clean up spaces decodes through its backend directly (what its
    ``decode`` returns then); one that does goes through its own ``_decode`` (``decode``
    without the input conversion); anything else through ``decode``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        if getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
            return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
        inner = getattr(tokenizer, "_decode", None)
        if callable(inner):
            return lambda ids, skip: inner(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


def start(seq: Sequence) -> None:
    seq.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
    seq.read_offset = seq.num_prompt_tokens


def detokenize_step(decode: Decode, seq: Sequence) -> str:
    """Append the text of ``seq``'s newest token(s) to ``seq.output_text``; return the new text.
    ``decode``: :func:`decoder` of the tokenizer."""
    skip = seq.params.skip_special_tokens
    ids = seq.token_ids
    prefix = decode(ids[seq.prefix_offset : seq.read_offset], skip)
    full = decode(ids[seq.prefix_offset :], skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix) :]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.output_text += delta
        return delta
    return ""
