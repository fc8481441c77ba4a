"""Sampling parameters, with vLLM's field names so that users carry their code over."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import Range, check_bool, check_text, check_token_ids, is_int

# Temperatures below this are greedy (dividing logits by ~0 overflows to inf and NaN).
MIN_TEMPERATURE = 1e-5

# The type and range of every numeric field: what validate() enforces and what the HTTP schema
# (pagedq.serve.protocol) declares, so that the two never disagree.
RANGES: dict[str, Range] = {
    "n": Range(int, ge=1),
    "temperature": Range(float, ge=0, hint="0 means greedy"),
    "top_p": Range(float, gt=0, le=1),
    "top_k": Range(int, ge=-1, hint="0 or -1 disables it"),
    "min_p": Range(float, ge=0, le=1),
    "seed": Range(int, ge=-(2**63), le=2**63 - 1, optional=True),
    "presence_penalty": Range(float, ge=-2, le=2),
    "frequency_penalty": Range(float, ge=-2, le=2),
    "repetition_penalty": Range(float, gt=0, hint="1 disables it"),
    "max_tokens": Range(int, ge=1, optional=True),
    "min_tokens": Range(int, ge=0),
    "logprobs": Range(int, ge=0, optional=True),
    "prompt_logprobs": Range(int, ge=0, optional=True),
}
FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
LOGIT_BIAS = Range(float, ge=-100, le=100)


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    ``temperature=0`` means greedy. ``seed`` gives a request its own random generator, so
    its tokens do not depend on what else is in the batch. ``stop`` strings end generation
    and are not part of the returned text. ``logprobs=k`` returns the top-k log-probabilities
    (of the model's raw distribution) beside each sampled token; ``prompt_logprobs=k`` does the
    same for every prompt token after the first.
    """

    n: int = field(default=1, metadata={"help": "samples per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "0 means greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the top tokens of this mass"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 or -1: all)"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability"})
    seed: int | None = field(default=None, metadata={"help": "the request's own random seed"})
    presence_penalty: float = field(default=0.0, metadata={"help": "penalty for tokens already generated"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "penalty per time a token was generated"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL-style penalty (1 disables it)"})
    stop: str | list[str] | None = field(default=None, metadata={"help": "stop string (repeatable)"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "stop token id (repeatable)"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating after the EOS token"})
    max_tokens: int | None = field(default=16, metadata={"help": "tokens to generate at most"})
    min_tokens: int = field(default=0, metadata={"help": "tokens to generate before stops apply"})
    logprobs: int | None = field(default=None, metadata={"help": "top-k log-probabilities of every token"})
    prompt_logprobs: int | None = field(
        default=None, metadata={"help": "top-k log-probabilities of every prompt token"}
    )
    logit_bias: dict[int, float] | None = field(default=None, metadata={"help": "token id -> bias"})
    skip_special_tokens: bool = field(default=True, metadata={"help": "leave special tokens out of the text"})
    include_stop_str_in_output: bool = field(
        default=False, metadata={"help": "keep the stop string at the end of the text"}
    )
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        """Check every field's type and range (``ValueError`` naming the field, what is allowed
        and the value); normalizes ``stop`` and ``stop_token_ids`` to lists."""
        for name, rng in RANGES.items():
            rng.check(name, getattr(self, name))
        for name in FLAGS:
            check_bool(name, getattr(self, name))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} max_tokens={self.max_tokens}"
            )
        self._stop_list = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)

    def check_vocab(self, vocab_size: int) -> None:
        """Checks that need the model: token ids must exist in its vocabulary."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", list(self.logit_bias or {})),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(
                    f"{name} has token ids outside the vocabulary (size {vocab_size}): {bad[:5]}"
                )
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if k is not None and k > vocab_size:
                raise ValueError(f"{name} must be <= the vocabulary size {vocab_size}, got {k}")


@dataclass
class BeamSearchParams:
    """Parameters of one beam-search request (the names of vLLM's ``BeamSearchParams``).

    ``length_penalty`` is the exponent of the length in the score of a finished hypothesis
    (``> 0`` favours longer ones). ``early_stopping`` is ``True`` (stop once ``beam_width``
    hypotheses finished), ``False`` (stop when no live beam can still beat them, judged at the
    current length) or ``"never"`` (judged at the best length possible).
    """

    beam_width: int = field(metadata={"help": "beam search with this many beams"})
    max_tokens: int = 16
    length_penalty: float = field(
        default=1.0, metadata={"help": "beam search: exponent of the length in the score"}
    )
    early_stopping: bool | str = False
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True

    # Read by the parts of the engine that handle every kind of request.
    logprobs = None
    prompt_logprobs = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n(self) -> int:
        return self.beam_width

    def validate(self) -> None:
        """Check every field's type and range (``ValueError``); ``stop_token_ids`` becomes a list."""
        Range(int, ge=1).check("beam_width", self.beam_width)
        Range(int, ge=1).check("max_tokens", self.max_tokens)
        Range(float).check("length_penalty", self.length_penalty)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        check_bool("ignore_eos", self.ignore_eos)
        check_bool("skip_special_tokens", self.skip_special_tokens)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        self.stop_token_ids = check_token_ids("stop_token_ids", ids)

    def check_vocab(self, vocab_size: int) -> None:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(
                f"stop_token_ids has token ids outside the vocabulary (size {vocab_size}): {bad}"
            )
        if self.beam_width > vocab_size:
            raise ValueError(f"beam_width must be <= the vocabulary size {vocab_size}, got {self.beam_width}")


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for i, s in enumerate(stop):
        check_text(f"stop[{i}]", s, allow_empty=False)
    return list(stop)


def _token_ids(name: str, ids) -> list[int]:
    ids = [] if ids is None else ids
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    for t in ids:
        if not is_int(t) or t < 0:
            raise ValueError(f"{name} must hold token ids (integers >= 0), got {t!r}")
    return list(ids)


def _check_logit_bias(bias) -> None:
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    for k, v in bias.items():
        if not is_int(k) or k < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {k!r}")
        LOGIT_BIAS.check(f"logit_bias[{k}]", v)
