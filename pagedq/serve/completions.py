"""``POST /v1/completions``: one or more prompts (text or token ids), ``n`` samples each,
streamed as server-sent events or returned whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .handlers import GenerationHandler
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def token_text(lp) -> str:
    return lp.decoded_token or ""  # the engine decodes every logprob token


def completion_logprobs(token_ids: list[int], dists: list, start: int = 0) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs of ``token_ids`` (text offsets from ``start``); and the next offset."""
    tokens, lps, tops, offsets, pos = [], [], [], [], start
    for token_id, dist in zip(token_ids, dists):
        text = token_text(dist[token_id])
        tokens.append(text)
        lps.append(dist[token_id].logprob)
        tops.append({token_text(lp): lp.logprob for lp in dist.values()})
        offsets.append(pos)
        pos += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets), pos


class CompletionsHandler(GenerationHandler):
    async def post(self):
        req = await self.begin(CompletionRequest)
        params = req.sampling_params()
        prompts = req.prompts()
        self.state.admission.check_request(len(prompts), params)
        counts = await self.submit_all(prompts, params, self.user)
        self.new_id("cmpl")
        want_logprobs = params.logprobs is not None
        if req.stream:
            await self.stream(self._chunks(params.n, counts, req.include_usage, want_logprobs))
            return
        choices = await self.collect()
        if choices is None:
            return
        out = []
        for (i, j), c in sorted(choices.items()):
            lp = completion_logprobs(c.token_ids, c.logprobs)[0] if want_logprobs else None
            out.append(
                CompletionChoice(
                    index=i * params.n + j,
                    text=c.text,
                    logprobs=lp,
                    finish_reason=c.finish_reason,
                    token_ids=c.token_ids,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        self.send_json(
            CompletionResponse(
                id=self.request_id,
                created=self.created,
                model=self.state.model_name,
                choices=out,
                usage=usage(sum(counts), completion_tokens),
            )
        )

    async def _chunks(
        self, n: int, counts: list[int], include_usage: bool, want_logprobs: bool
    ) -> AsyncIterator:
        completion_tokens = 0
        offsets: dict[tuple[int, int], int] = {}
        head = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_name,
        }
        async for index, delta in self.outputs(keepalive=True):
            for c in delta.choices:
                completion_tokens += len(c.token_ids)
                lp = None
                if want_logprobs:
                    key = (index, c.index)
                    logprobs, offsets[key] = completion_logprobs(
                        c.token_ids, c.logprobs or [], offsets.get(key, 0)
                    )
                    lp = logprobs.model_dump()
                choice = {
                    "index": index * n + c.index, "text": c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason, "token_ids": c.token_ids,
                }  # fmt: skip
                yield {**head, "choices": [choice]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(sum(counts), completion_tokens).model_dump()}
