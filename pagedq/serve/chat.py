"""``POST /v1/chat/completions``: a conversation through the model's chat template (applied in
the engine process, which holds the tokenizer), ``n`` samples, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .completions import token_text, usage
from .handlers import GenerationHandler
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    TokenLogprob,
    TopLogprob,
)
from .worker import Chat


def chat_logprobs(token_ids: list[int], dists: list, k: int) -> ChatLogprobs:
    content = []
    for token_id, dist in zip(token_ids, dists):
        text = token_text(dist[token_id])
        top = sorted(dist.values(), key=lambda lp: -lp.logprob)[:k]
        content.append(
            TokenLogprob(
                token=text,
                logprob=dist[token_id].logprob,
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(token=token_text(lp), logprob=lp.logprob, bytes=list(token_text(lp).encode()))
                    for lp in top
                ],
            )
        )
    return ChatLogprobs(content=content)


class ChatCompletionsHandler(GenerationHandler):
    async def post(self):
        req = await self.begin(ChatCompletionRequest)
        params = req.sampling_params()
        self.state.admission.check_request(1, params, logprobs_field="top_logprobs")
        prompt = Chat([m.for_template() for m in req.messages], req.add_generation_prompt)
        counts = await self.submit_all([prompt], params, self.user)
        self.new_id("chatcmpl")
        k = params.logprobs
        if req.stream:
            await self.stream(self._chunks(counts[0], req.include_usage, k))
            return
        choices = await self.collect()
        if choices is None:
            return
        out = [
            ChatChoice(
                index=j,
                message=AssistantMessage(content=c.text),
                logprobs=chat_logprobs(c.token_ids, c.logprobs, k) if k is not None else None,
                finish_reason=c.finish_reason,
                token_ids=c.token_ids,
            )
            for (_, j), c in sorted(choices.items())
        ]
        completion_tokens = sum(len(c.token_ids) for c in choices.values())
        self.send_json(
            ChatCompletionResponse(
                id=self.request_id,
                created=self.created,
                model=self.state.model_name,
                choices=out,
                usage=usage(counts[0], completion_tokens),
            )
        )

    async def _chunks(self, prompt_tokens: int, include_usage: bool, k: int | None) -> AsyncIterator:
        head = {
            "id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.state.model_name,
        }  # fmt: skip
        announced: set[int] = set()
        completion_tokens = 0
        async for _, delta in self.outputs(keepalive=True):
            for c in delta.choices:
                completion_tokens += len(c.token_ids)
                d = {"content": c.text}
                if c.index not in announced:
                    announced.add(c.index)
                    d = {"role": "assistant", "content": c.text}
                lp = chat_logprobs(c.token_ids, c.logprobs or [], k).model_dump() if k is not None else None
                choice = {
                    "index": c.index,
                    "delta": d,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                    "token_ids": c.token_ids,
                }
                yield {**head, "choices": [choice]}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens).model_dump()}
