"""The load generator of `tokenforge bench`: streams chat completions from an OpenAI-compatible
endpoint (httpx, SSE parsed by hand: no SDK cost in the client), `concurrency` at a time and
optionally at a Poisson request rate, and times each request: time to first token, the gaps
between streamed chunks, and its tokens (the server's streamed usage when it sends one).
"""

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from tokenforge.errors import TokenforgeError

DEFAULT_TIMEOUT_S = 600.0


class EndpointError(TokenforgeError):
    """The endpoint cannot be reached, or does not answer a chat completion."""


@dataclass
class RequestTiming:
    """One request as its caller saw it; times from the moment it was sent."""
    latency_s: float
    ttft_s: float | None  # None: no token arrived
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive token-bearing chunks
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None  # from the server's usage, when it sends one
    error: str | None = None


@dataclass
class LoadResult:
    concurrency: int
    request_rate: float | None  # requests/s of the arrival process; None: all at once
    wall_s: float  # first request sent to last one done
    timings: list[RequestTiming]


# (index, conversation) -> its timing; never raises for a failed request (the timing carries the error)
SendFn = Callable[[int, list[dict]], Awaitable[RequestTiming]]


class StreamTimer:
    """Collects one request's timing from its token arrivals."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.itl_s: list[float] = []
        self.num_chunks = 0

    def on_tokens(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.itl_s.append(now - self.last)
        self.last = now
        self.num_chunks += 1

    def finish(self, num_output_tokens: int | None = None, num_prompt_tokens: int | None = None,
               error: str | None = None) -> RequestTiming:
        """num_output_tokens None: count one token per chunk."""
        ttft_s = None if self.first is None else self.first - self.started
        return RequestTiming(time.perf_counter() - self.started, ttft_s, self.itl_s,
                             self.num_chunks if num_output_tokens is None else num_output_tokens,
                             num_prompt_tokens, error)


def arrival_times(num_requests: int, request_rate: float | None, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request may go: all at 0 without a rate, else a
    Poisson process (exponential gaps of mean 1/rate) from a seeded RNG."""
    if request_rate is None or request_rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


async def run_load(send: SendFn, conversations: list[list[dict]], concurrency: int,
                   request_rate: float | None = None, seed: int = 0) -> LoadResult:
    """Sends every conversation, at most `concurrency` in flight, each no earlier than its arrival time."""
    semaphore = asyncio.Semaphore(concurrency)
    arrivals = arrival_times(len(conversations), request_rate, seed)
    started = time.perf_counter()

    async def one(index: int, conversation: list[dict]) -> RequestTiming:
        delay_s = started + arrivals[index] - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        async with semaphore:
            return await send(index, conversation)

    timings = await asyncio.gather(*(one(i, c) for i, c in enumerate(conversations)))
    return LoadResult(concurrency, request_rate, time.perf_counter() - started, list(timings))


class HttpClient:
    """Streams /chat/completions from `base_url` (ending in /v1). Use as `async with`."""

    def __init__(self, base_url: str, model: str, max_tokens: int, *, api_key: str | None = None,
                 ignore_eos: bool = True, max_connections: int = 64, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.model = model
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                                         timeout=httpx.Timeout(timeout_s, connect=30.0))

    async def __aenter__(self) -> "HttpClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    async def check(self) -> None:
        """One tiny non-streamed request, so that a wrong URL, key or model fails before the sweep."""
        body = {**self.body([{"role": "user", "content": "Hi"}]), "stream": False, "max_tokens": 1}
        body.pop("stream_options")
        try:
            response = await self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise EndpointError(f"cannot reach {self._client.base_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise EndpointError(f"{self._client.base_url}/chat/completions answered HTTP {response.status_code}: "
                                f"{response.text[:300]}")

    def body(self, conversation: list[dict]) -> dict:
        body = {"model": self.model, "messages": conversation, "max_tokens": self.max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:  # vLLM's and llama.cpp's extension: every request makes max_tokens tokens
            body["ignore_eos"] = True
        return body

    async def send(self, index: int, conversation: list[dict]) -> RequestTiming:
        timer = StreamTimer()
        usage = None
        try:
            async with self._client.stream("POST", "/chat/completions", json=self.body(conversation)) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return timer.finish(error=f"HTTP {response.status_code}: {text[:300]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return timer.finish(error=f"stream error: {str(chunk['error'])[:300]}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if any(_has_text(c.get("delta") or {}) for c in chunk.get("choices") or ()):
                        timer.on_tokens()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            return timer.finish(error=f"{type(exc).__name__}: {exc}")
        if usage is None:
            return timer.finish()
        return timer.finish(usage.get("completion_tokens"), usage.get("prompt_tokens"))


def _has_text(delta: dict) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content"))
