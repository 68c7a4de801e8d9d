"""POST /v1/completions: prompts (text or token ids) -> engine requests -> one JSON body or SSE chunks.

Choice k*n + i is sample i of prompt k, as in OpenAI's API.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import Response
from starlette.requests import Request

from tokenforge.errors import InvalidRequestError
from tokenforge.server.errors import to_api_error
from tokenforge.server.generation import (ChoiceState, Handler, RequestGroup, check_context, collect_choices,
                                          check_num_sequences, make_sampling_params, make_usage, random_id)
from tokenforge.server.protocol import Completion, CompletionChoice, CompletionRequest, LegacyLogprobs, now_s
from tokenforge.server.serving_chat import CLIENT_CLOSED_REQUEST
from tokenforge.server.sse import DONE, EventStreamResponse, error_event, event


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # what echo returns


def split_prompts(prompt: str | list) -> list[str | list[int]]:
    """The four shapes of `prompt` (a string, strings, token ids, lists of token ids) -> a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def encode_text(tokenizer, text: str, **options) -> list[int]:
    """The token ids of a prompt string; 400 for one with a lone surrogate (JSON's "\\ud800" escapes
    allow it), which is no Unicode text a tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError("the prompt is not valid Unicode text (it has a lone surrogate)",
                                  param="prompt") from None
    return tokenizer.encode(text, **options)


def encode_prompts(tokenizer, prompts: list[str | list[int]], echo: bool, vocab_size: int) -> list[Prompt]:
    """Token ids (and the text to echo) of each prompt; token ids are range-checked first."""
    encoded = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids", param="prompt")
            encoded.append(Prompt(encode_text(tokenizer, prompt), prompt))
        else:
            if any(not 0 <= t < vocab_size for t in prompt):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
            text = tokenizer.decode(prompt) if echo and tokenizer is not None else ""
            encoded.append(Prompt(list(prompt), text))
    return encoded


class CompletionHandler(Handler):
    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        req.check_supported()
        core = self.engine.core
        vocab_size = core.arch.vocab_size
        raw_prompts = split_prompts(req.prompt)
        check_num_sequences(len(raw_prompts) * req.n, self.engine)
        prompts = await asyncio.to_thread(encode_prompts, core.tokenizer, raw_prompts, req.echo, vocab_size)
        for prompt in prompts:
            if not prompt.token_ids:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            check_context(len(prompt.token_ids), req.max_tokens, core.max_model_len, "prompt")
        params = make_sampling_params(req, req.max_tokens, req.logprobs, vocab_size)
        completion_id = random_id("cmpl")
        group = await self.start_group(raw, "completions", completion_id, [p.token_ids for p in prompts], params,
                                       core.max_model_len)
        echoes = [prompts[i // req.n].text if req.echo else "" for i in range(len(prompts) * req.n)]
        if req.stream:
            return EventStreamResponse(self._stream(group, completion_id, req, echoes), on_close=group.close)
        choices = await collect_choices(raw, group, len(echoes))
        if choices is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = Completion(
            id=completion_id,
            model=self.model_name,
            choices=[
                CompletionChoice(index=i, text=echoes[i] + c.text, finish_reason=c.finish_reason,
                                 logprobs=None if req.logprobs is None else self._logprobs(c.logprobs, len(echoes[i])))
                for i, c in enumerate(choices)
            ],
            usage=make_usage(choices, req.n),
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def _stream(self, group: RequestGroup, completion_id: str, req: CompletionRequest,
                      echoes: list[str]) -> AsyncIterator[bytes]:
        created = now_s()
        exclude = None if req.include_usage else {"usage"}

        def chunk(choices: list[CompletionChoice], usage=None) -> bytes:
            body = Completion(id=completion_id, created=created, model=self.model_name, choices=choices, usage=usage)
            return event(body.model_dump_json(exclude=exclude))

        choices = [ChoiceState() for _ in echoes]
        text_offsets = [len(echo) for echo in echoes]
        try:
            for index, echo in enumerate(echoes):
                if echo:
                    yield chunk([CompletionChoice(index=index, text=echo)])
            async for index, out in group:
                state = choices[index]
                state.update(out, keep=False)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(out.new_logprobs, text_offsets[index])
                    text_offsets[index] += sum(len(t) for t in logprobs.tokens)
                if out.new_text or out.new_logprobs or out.finished:
                    yield chunk([CompletionChoice(index=index, text=out.new_text, logprobs=logprobs,
                                                  finish_reason=state.finish_reason)])
            if req.include_usage:
                yield chunk([], usage=make_usage(choices, req.n))
        except Exception as exc:  # noqa: BLE001 - the 200 is sent: report the error in the stream
            yield error_event(to_api_error(exc).body())
        finally:
            await group.close()
        yield DONE

    def _logprobs(self, entries, text_offset: int) -> LegacyLogprobs:
        """Engine logprobs -> the legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""
        result = LegacyLogprobs()
        for token_id, logprob, top in entries:
            text = self.token_texts.text(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append({self.token_texts.text(i): lp for i, lp in top})
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result
