"""Server-sent events as OpenAI sends them: each event is `data: <json>\\n\\n`, the last `data: [DONE]\\n\\n`."""

import json
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: str) -> bytes:
    """One event; `payload` is a single line of JSON (json.dumps and pydantic never emit newlines)."""
    return b"data: " + payload.encode() + b"\n\n"


def error_event(body: dict) -> bytes:
    """An error after the 200 went out; the openai SDK raises APIError on it."""
    return event(json.dumps(body))


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that always closes its generator and then calls `on_close`,
    so a client that goes away aborts its requests at once: Starlette cancels the send but leaves
    the generator open, and a generator cancelled before its first step never runs its finally."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]] | None = None):
        super().__init__(events, headers={"cache-control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self.on_close is not None:
                await self.on_close()
