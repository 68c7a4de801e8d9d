"""POST /v1/chat/completions: messages -> chat template -> engine requests -> one JSON body or SSE chunks."""

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import Response
from starlette.requests import Request

from tokenforge.errors import InvalidRequestError
from tokenforge.server.errors import to_api_error
from tokenforge.server.generation import (ChoiceState, Handler, RequestGroup, check_context, collect_choices,
                                          check_num_sequences, make_sampling_params, make_usage, random_id)
from tokenforge.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                        ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ChoiceLogprobs,
                                        TokenLogprob, TopLogprob, now_s)
from tokenforge.server.sse import DONE, EventStreamResponse, error_event, event

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages -> the {"role", "content"} dicts chat templates expect (text parts joined)."""
    dicts = []
    for message in messages:
        parts = message.content or []
        content = message.content if isinstance(message.content, str) else "\n".join(p.text for p in parts)
        dicts.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return dicts


def apply_chat_template(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template: use /v1/completions", param="messages")
    try:
        ids = tokenizer.apply_chat_template(messages_to_dicts(messages), add_generation_prompt=add_generation_prompt,
                                            tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template may reject any message sequence (roles, order)
        raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class ChatHandler(Handler):
    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        req.check_supported()
        core = self.engine.core
        # Templating and tokenizing a long conversation takes milliseconds: keep the loop free.
        prompt_token_ids = await asyncio.to_thread(apply_chat_template, core.tokenizer, req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequestError(f"{max_tokens_param} must be at least 1, got {max_tokens}",
                                      param=max_tokens_param)
        check_context(len(prompt_token_ids), max_tokens, core.max_model_len, "messages", max_tokens_param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = make_sampling_params(req, max_tokens, logprobs, core.arch.vocab_size)
        check_num_sequences(req.n, self.engine)
        completion_id = random_id("chatcmpl")
        group = await self.start_group(raw, "chat", completion_id, [prompt_token_ids], params, core.max_model_len)
        if req.stream:
            return EventStreamResponse(self._stream(group, completion_id, req), on_close=group.close)
        choices = await collect_choices(raw, group, req.n)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = ChatCompletion(
            id=completion_id,
            model=self.model_name,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                           logprobs=self._logprobs(c.logprobs, req.top_logprobs) if req.logprobs else None)
                for i, c in enumerate(choices)
            ],
            usage=make_usage(choices, req.n),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, group: RequestGroup, completion_id: str,
                      req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        created = now_s()
        exclude = None if req.include_usage else {"usage"}

        def chunk(choices: list[ChatChunkChoice], usage=None) -> bytes:
            body = ChatCompletionChunk(id=completion_id, created=created, model=self.model_name, choices=choices,
                                       usage=usage)
            return event(body.model_dump_json(exclude=exclude))

        choices = [ChoiceState() for _ in range(req.n)]
        try:
            for index in range(req.n):
                yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
            async for index, out in group:
                choices[index].update(out, keep=False)
                logprobs = self._logprobs(out.new_logprobs, req.top_logprobs) if req.logprobs else None
                if out.new_text or (logprobs is not None and logprobs.content):
                    yield chunk([ChatChunkChoice(index=index, delta={"content": out.new_text}, logprobs=logprobs)])
                if out.finished:
                    yield chunk([ChatChunkChoice(index=index, delta={}, finish_reason=choices[index].finish_reason)])
            if req.include_usage:
                yield chunk([], usage=make_usage(choices, req.n))
        except Exception as exc:  # noqa: BLE001 - the 200 is sent: report the error in the stream
            yield error_event(to_api_error(exc).body())
        finally:
            await group.close()
        yield DONE

    def _logprobs(self, entries, num_top: int | None) -> ChoiceLogprobs:
        """Engine logprobs [(token_id, logprob, top [(id, logprob)])] -> OpenAI's logprobs.content."""
        content = []
        for token_id, logprob, top in entries:
            text, raw = self.token_texts.get(token_id)
            tops = [self._top_logprob(i, lp) for i, lp in top[: num_top or 0]]
            content.append(TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=tops))
        return ChoiceLogprobs(content=content)

    def _top_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        text, raw = self.token_texts.get(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)
