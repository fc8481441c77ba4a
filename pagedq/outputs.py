"""What a request gives back: vLLM's ``RequestOutput`` / ``CompletionOutput`` shapes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token, with its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them when ``SamplingParams.n > 1``; the
    ``beam_width`` best hypotheses, best first, for beam search)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    # "stop", "length", "abort", "error" (the engine failed this request: RequestOutput.error
    # says why; its text is cut off) or None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # beam search: cumulative_logprob / num_tokens ** length_penalty, what the beams are ranked by
    score: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # why the engine failed this request (its outputs then end with finish_reason "error")
    error: str | None = None

    def raise_if_failed(self) -> RequestOutput:
        """This output, unless the engine failed the request: then :class:`GenerationError`."""
        if self.error is not None:
            raise GenerationError(f"request {self.request_id} failed: {self.error}", [self])
        return self


class GenerationError(RuntimeError):
    """Requests that the engine could not finish. ``outputs`` holds every output of the call,
    the failed ones with ``finish_reason="error"`` and ``error`` set."""

    def __init__(self, message: str, outputs: list[RequestOutput] | None = None):
        super().__init__(message)
        self.outputs = outputs or []
