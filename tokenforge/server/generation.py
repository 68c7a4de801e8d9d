"""What chat and completions share: request -> SamplingParams, the context-length check, the n
engine requests of one API request merged into one stream, and cancelling on client disconnect.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request

from tokenforge.control import metering
from tokenforge.control.pricing import ModelFacts
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.engine.llm import child_params
from tokenforge.engine.outputs import RequestOutput
from tokenforge.engine.request import FinishReason
from tokenforge.errors import InvalidRequestError
from tokenforge.sampling_params import SamplingParams
from tokenforge.server.billing import Billing, Meter
from tokenforge.server.metrics import ServerMetrics
from tokenforge.server.protocol import PromptTokensDetails, SamplingRequest, Usage
from tokenforge.server.token_text import TokenTexts

T = TypeVar("T")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def parse_logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float]:
    try:
        return {int(key): value for key, value in (logit_bias or {}).items()}
    except ValueError:
        raise InvalidRequestError("logit_bias keys must be token ids (integers as strings)",
                                  param="logit_bias") from None


def make_sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                         vocab_size: int) -> SamplingParams:
    """The request's SamplingParams; raises InvalidRequestError (with .param) for bad values."""
    def given(value, default):
        return default if value is None else value

    params = SamplingParams(
        n=req.n,
        temperature=given(req.temperature, 1.0),
        top_p=given(req.top_p, 1.0),
        top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
        min_p=given(req.min_p, 0.0),
        seed=req.seed,
        presence_penalty=given(req.presence_penalty, 0.0),
        frequency_penalty=given(req.frequency_penalty, 0.0),
        repetition_penalty=given(req.repetition_penalty, 1.0),
        logit_bias=parse_logit_bias(req.logit_bias),
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=given(req.stop, []),
        stop_token_ids=given(req.stop_token_ids, []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        num_speculative_tokens=req.num_speculative_tokens,
    )
    params.validate_for_vocab(vocab_size)
    return params


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str,
                  max_tokens_param: str = "max_tokens") -> None:
    """400 for a prompt (plus max_tokens) over the context: never truncate silently."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your {param} resulted in "
            f"{num_prompt_tokens} tokens, which leaves no room for the completion. Please shorten them.", param=param)
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in the "
            "completion). Please reduce the length of the prompt or the completion.", param=max_tokens_param)


def check_num_sequences(num_sequences: int, engine: AsyncEngine) -> None:
    """400 for a request that could never be admitted whole (prompts x n over the queue bound)."""
    scheduler = engine.core.config.scheduler
    capacity = scheduler.max_num_waiting + scheduler.max_num_seqs
    if num_sequences > capacity:
        raise InvalidRequestError(f"this request needs {num_sequences} sequences (prompts x n); this server takes "
                                  f"at most {capacity} at once", param="n")


class RequestGroup:
    """The engine requests behind one API request (n choices, or prompts x n), run in their own
    tasks and merged into one stream of (choice index, delta). Closing it aborts them all."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, meter: Meter | None = None):
        self.engine = engine
        self.metrics = metrics
        self.meter = meter  # settled on close with what the engine processed
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._num_unfinished = 0
        self._first_indices: list[int] = []  # the first choice of each prompt: its prompt is billed once
        self._counts: dict[int, RequestOutput] = {}  # the latest output of each choice
        self._status: str | None = None  # "error" or "refused" once known

    def add(self, index: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queues the `params.n` samples of one prompt as choices index, index + 1, ..."""
        self._first_indices.append(index)
        for i in range(params.n):
            child = child_params(params, i)
            task = asyncio.create_task(self._pump(index + i, f"{request_id}-{index + i}", prompt_token_ids, child))
            self._tasks.append(task)
            self._num_unfinished += 1

    async def start(self) -> None:
        """Waits until the engine took or refused every request, and raises its refusal
        (QueueFullError, EngineDeadError, InvalidRequestError) before anything is sent."""
        # AsyncEngine.generate admits or refuses synchronously on its first step, which every task
        # has run once the loop comes back to us.
        await asyncio.sleep(0)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._status = "refused"
                await self.close()
                raise task.exception()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._num_unfinished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self._status = "error"
                raise item
            self._counts[index] = item
            if item.finished:
                self._num_unfinished -= 1
                if not self._num_unfinished:
                    # Billed before the client sees the end: a crash after it cannot lose the record.
                    await self._settle()
            yield index, item

    async def close(self) -> None:
        """Aborts whatever is still running (leaving engine.generate aborts its request), then
        settles the meter with what was processed. Safe to call more than once."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._settle()

    async def _settle(self) -> None:
        if self.meter is not None:
            status = self._status or ("ok" if self._num_unfinished == 0 else "client_closed")
            await self.meter.settle(self.usage(), status)

    def usage(self) -> metering.Usage:
        """What the engine processed so far: every choice's output tokens, each prompt once. A prompt
        whose choices produced nothing yet is not charged (its prefill may not have finished)."""
        num_prompt = num_cached = 0
        seen = sorted(self._counts.items())
        for first, end in zip(self._first_indices, [*self._first_indices[1:], None]):
            out = next((out for index, out in seen if first <= index and (end is None or index < end)), None)
            if out is not None:
                num_prompt += out.num_prompt_tokens
                num_cached += out.num_cached_tokens
        num_completion = sum(out.num_output_tokens for out in self._counts.values())
        return metering.Usage(num_prompt, num_cached, num_completion)

    async def _pump(self, index: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        timer = self.metrics.request_timer()
        try:
            async for out in self.engine.generate(request_id, prompt_token_ids, params):
                timer.observe(out)
                self._queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who maps it to an error
            self._queue.put_nowait((index, exc))
            raise


class Handler:
    """What every endpoint handler holds: its engine, served name, metrics, token texts."""

    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, billing: Billing | None = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.billing = billing
        self.facts = ModelFacts(model_name, engine.core.num_params)
        self.token_texts = TokenTexts(engine.tokenizer)

    async def start_group(self, raw: Request, endpoint: str, request_id: str, prompts: list[list[int]],
                          params: SamplingParams, max_model_len: int) -> RequestGroup:
        """Reserves the worst case of the request (all prompts x n choices at max_tokens, or up to the
        context), then queues its engine requests; raises the refusal of either."""
        meter = None
        if self.billing is not None:
            num_prompt = sum(len(p) for p in prompts)
            num_completion = sum(params.n * (params.max_tokens or max_model_len - len(p)) for p in prompts)
            meter = await self.billing.admit(raw, self.facts, endpoint, request_id, num_prompt, num_completion)
        group = RequestGroup(self.engine, self.metrics, meter)
        for k, prompt in enumerate(prompts):
            group.add(k * params.n, request_id, prompt, params)
        await group.start()
        return group


async def collect_choices(raw: Request, group: RequestGroup, num_choices: int) -> list["ChoiceState"] | None:
    """Runs a non-streaming request group to the end: its choices, or None if the client left."""

    async def collect() -> list[ChoiceState]:
        choices = [ChoiceState() for _ in range(num_choices)]
        async for index, out in group:
            choices[index].update(out, keep=True)
        return choices

    try:
        return await cancel_on_disconnect(raw, collect())
    finally:
        await group.close()


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Runs `work` until it ends or the client disconnects; then cancels it and returns None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read already: the next message on the channel is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class ChoiceState:
    """One choice as its deltas arrive: text, token counts, logprobs, finish reason."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def update(self, out: RequestOutput, keep: bool) -> None:
        """Counts a delta; `keep`: also keep its text and logprobs (non-streaming responses)."""
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.num_output_tokens = out.num_output_tokens
        if keep:
            self.texts.append(out.new_text)
            self.logprobs.extend(out.new_logprobs)
        if out.finished:
            self.finish_reason = finish_reason_of(out)


def finish_reason_of(out: RequestOutput) -> str:
    """OpenAI's finish_reason; an engine-side error or abort becomes an error response instead."""
    if out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return out.finish_reason.value
    raise RuntimeError(f"request {out.request_id} ended with {out.finish_reason}: {out.error or 'no detail'}")


def make_usage(choices: list[ChoiceState], n: int) -> Usage:
    """Prompt tokens count once per prompt (choices [k*n, (k+1)*n) share prompt k)."""
    firsts = choices[::n]
    num_prompt = sum(c.num_prompt_tokens for c in firsts)
    num_output = sum(c.num_output_tokens for c in choices)
    return Usage(prompt_tokens=num_prompt, completion_tokens=num_output, total_tokens=num_prompt + num_output,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c.num_cached_tokens for c in firsts)))
