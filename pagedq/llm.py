"""``LLM``: the offline API, shaped like vLLM's so that code moves between the two unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import cast

from .checks import check_bool, check_text
from .config import EngineConfig
from .driver import EngineDriver
from .engine import LLMEngine, ParamsType, PromptType
from .outputs import GenerationError, RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams
from .sequence import Request


class LLM:
    """A model with its paged KV cache, ready to generate.

    >>> llm = LLM("path/to/model", dtype="bfloat16", kv_cache_memory="1GiB")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=20))[0].outputs[0].text

    ``close()`` (or leaving a ``with LLM(...) as llm:`` block) frees the weights and the cache,
    so a new ``LLM`` can be created in the same process at once.
    """

    def __init__(self, model: str, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        # Who steps the engine: the caller's thread (InlineLoop) until start_driver() hands the
        # loop to a background EngineDriver; generate / stream / next_token_logprobs go through it.
        self._loop: InlineLoop | EngineDriver = InlineLoop(self.engine)

    def start_driver(self, listener: Callable[[list[RequestOutput]], None] | None = None) -> EngineDriver:
        """Hand the engine's loop to a background thread (notebook cells, widgets and the serving
        worker share one continuous batch that way); returns it. Later calls return the same
        driver; ``close()`` stops it. ``listener(outputs)`` sees every step's outputs."""
        if isinstance(self._loop, EngineDriver):
            if listener is not None:
                raise ValueError("this LLM's driver is already running; its listener is fixed")
            return self._loop
        self._loop = EngineDriver(self.engine, listener)
        return self._loop

    @property
    def driver(self) -> EngineDriver | None:
        """The background driver, if :meth:`start_driver` was called."""
        return self._loop if isinstance(self._loop, EngineDriver) else None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: ParamsType | Sequence[ParamsType] | None = None,
        use_tqdm: bool = True,
        user: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``. Every
        prompt is validated before any is queued, so one bad prompt queues nothing. A
        :class:`BeamSearchParams` in place of a ``SamplingParams`` runs beam search for that
        prompt, batched with the others. ``user`` names who asks, for an engine made with
        ``scheduling_policy="fair"`` (the engine shares itself fairly between users).
        """
        prompts = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        checked = self._validate_all(prompts, params)
        return _raise_failed(self._loop.generate(checked, params, user=user, use_tqdm=use_tqdm))

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Beam search for every prompt; each output lists the ``beam_width`` best hypotheses,
        best first (``outputs[0]``), with their ``score`` and ``cumulative_logprob``.

        The beams of a prompt share its KV blocks and copy only the block where they diverge;
        the results equal Hugging Face ``generate(num_beams=beam_width, do_sample=False)`` with
        the same ``length_penalty``, ``early_stopping`` and ``max_new_tokens``.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam_search needs a BeamSearchParams, got {type(params).__name__}")
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def next_token_logprobs(self, prompts: PromptType | Sequence[PromptType]) -> list:
        """For each prompt, the log-probabilities of every next token after every prefix:
        a float32 tensor ``[num_tokens - 1, vocab]`` whose row ``i`` is ``log p(. | tokens[:i+1])``.

        What perplexity and KL-divergence studies of quantized models need (``pagedq.quality.evaluate``).
        """
        prompts = _as_prompt_list(prompts)
        sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        checked = self._validate_all(prompts, [sp] * len(prompts))
        return self._loop.distributions(checked, sp)

    def stream(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield incremental outputs (cumulative text so far) as tokens are produced."""
        prompts = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        return self._loop.stream(self._validate_all(prompts, params), params)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate."""
        convs = cast(list[list[dict]], [messages] if messages and isinstance(messages[0], dict) else messages)
        tok = self.engine.tokenizer
        prompts = [chat_prompt(tok, conv, add_generation_prompt, chat_template) for conv in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (between benchmark runs of the same prompts, say); only when no
        request is running: returns False, doing nothing, otherwise."""
        return self._loop.reset_prefix_cache()

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        self._loop.close()
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _params_list(sampling_params, n: int) -> list[ParamsType]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, (SamplingParams, BeamSearchParams)):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"got {len(params)} sampling params for {n} prompts; pass one, or one per prompt"
            )
        return params

    def _validate_all(self, prompts: list[PromptType], params: list[ParamsType]) -> list[dict]:
        """Check every prompt before queueing any: one bad prompt queues nothing.

        Returns the prompts already tokenized, so that queueing them does not tokenize again.
        """
        checked = []
        for p, sp in zip(prompts, params):
            text, ids = self.engine.validate_request(p, sp)
            checked.append({"prompt": text, "prompt_token_ids": ids})
        return checked


class InlineLoop:
    """Steps the engine on the caller's thread until the caller's requests are done: the plain
    ``LLM`` (a script, a test). :class:`~pagedq.driver.EngineDriver` offers the same three calls
    from a background thread. Prompts arrive validated and tokenized (``LLM._validate_all``)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def generate(
        self, prompts: list[dict], params: list[ParamsType], user: str | None = None, use_tqdm: bool = False
    ) -> list[RequestOutput]:
        ids = [self.engine.add_request(p, sp, user=user) for p, sp in zip(prompts, params)]
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        try:
            while len(finals) < len(ids):
                if not self.engine.has_unfinished_requests():
                    missing = [rid for rid in ids if rid not in finals]
                    raise RuntimeError(
                        f"requests {missing} left the engine without finishing (aborted elsewhere?)"
                    )
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            # KeyboardInterrupt included: leave the engine empty and ready for the next call
            for rid in ids:
                if rid not in finals:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finals[rid] for rid in ids]

    def stream(self, prompts: list[dict], params: list[ParamsType]) -> Iterator[RequestOutput]:
        return self.engine.stream(prompts, params)

    def distributions(self, prompts: list[dict], params: SamplingParams) -> list:
        """Every prompt's next-token log-softmax rows (``LLM.next_token_logprobs``)."""
        import torch

        ids: list[str] = []
        reqs: dict[str, Request] = {}
        dists: dict[str, torch.Tensor] = {}
        try:
            for p in prompts:
                rid = self.engine.add_request(p, params)
                reqs[rid] = self.engine.requests[rid]
                reqs[rid].prompt_distributions = []
                ids.append(rid)
            while len(dists) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in reqs and out.request_id not in dists:
                        dists[out.request_id] = torch.cat(reqs[out.request_id].prompt_distributions or [])
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [dists[rid] for rid in ids]

    def close(self) -> None:
        """Nothing runs in the background."""


def chat_prompt(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
) -> dict:
    """One conversation through the tokenizer's chat template: ``{"prompt_token_ids": [...]}``."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass chat_template=... (a Jinja string)")
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.60}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}"
            )
        check_text(f"messages[{i}].role", m.get("role"), allow_empty=False)
        if m.get("content") is not None:
            check_text(f"messages[{i}].content", m["content"])
    check_bool("add_generation_prompt", add_generation_prompt)
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template
        )
    except Exception as e:  # the template refused the conversation (raise_exception, a bad role order, ...)
        raise ValueError(f"the chat template refused these messages: {type(e).__name__}: {e}") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return {"prompt_token_ids": list(ids)}


def _raise_failed(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """``outputs``, unless the engine failed some of them: then a :class:`GenerationError` that
    names them and carries every output (a cut-off text is never handed back as a result)."""
    failed = [o for o in outputs if o.error is not None]
    if failed:
        raise GenerationError(
            f"{len(failed)} of {len(outputs)} requests failed; request {failed[0].request_id}: {failed[0].error}",
            outputs,
        )
    return outputs


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts
