"""Incremental detokenization: the text of each new token, without decoding the whole sequence.

Decoding a token alone is wrong for byte-level and sentencepiece vocabularies (a character can
span tokens, a leading space depends on the token before). So each step decodes a short window
``token_ids[prefix_offset:]`` and subtracts the text of ``token_ids[prefix_offset:read_offset]``;
the window starts a few prompt tokens back so the first output token gets its context. Text
ending in U+FFFD is an unfinished multi-byte character and is held back until it completes.
"""

from __future__ import annotations

from .sequence import Sequence

_CONTEXT_TOKENS = 5


def start(seq: Sequence) -> None:
    seq.prefix_offset = max(seq.num_prompt_tokens - _CONTEXT_TOKENS, 0)
    seq.read_offset = seq.num_prompt_tokens


def detokenize_step(tokenizer, seq: Sequence) -> str:
    """Append the text of ``seq``'s newest token(s) to ``seq.output_text``; return the new text."""
    skip = seq.params.skip_special_tokens
    ids = seq.token_ids
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        delta = full[len(prefix) :]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.output_text += delta
        return delta
    return ""
