"""The outermost layer of every HTTP request: x-request-id, a bound on the body size, counting
requests by status, and a last-resort 500 in OpenAI's shape (the server must never crash).

Pure ASGI rather than BaseHTTPMiddleware, which would buffer streams and hide disconnects.
"""

import logging
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenforge.server.errors import APIError
from tokenforge.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_LEN = 128
DEFAULT_MAX_BODY_BYTES = 8 << 20
KNOWN_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize",
                             "/health", "/metrics", "/v1/organizations", "/v1/keys", "/v1/usage", "/v1/invoices",
                             "/v1/audit"})


class BodyTooLargeError(StarletteHTTPException):
    """A body that grows past the bound while it streams in (no content-length). An HTTPException,
    so that FastAPI's body parsing passes it on as a 413 rather than making it a 400."""

    def __init__(self, max_body_bytes: int):
        super().__init__(413, f"The request body is over {max_body_bytes} bytes, the most this server takes.")


def pick_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is sane (printable ASCII, not too long), else a new one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            if 0 < len(value) <= MAX_REQUEST_ID_LEN and all(0x21 <= b <= 0x7E for b in value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _rate_limit_headers(scope: Scope, present: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The x-ratelimit-* headers the control plane left in the request's state, unless already set."""
    state = scope.get("state", {}).get("rate_limit_headers") or {}
    names = {k.lower() for k, _ in present}
    return [(k.encode(), v.encode()) for k, v in state.items() if k.encode() not in names]


class Lifecycle:
    """Requests in flight, and whether the server is draining (shutting down: new requests get 503
    while the ones in flight finish)."""

    def __init__(self):
        self.num_in_flight = 0
        self.draining = False


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 lifecycle: Lifecycle | None = None):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.lifecycle = lifecycle or Lifecycle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = pick_request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{model}"
        started = False
        num_body_bytes = 0

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers += _rate_limit_headers(scope, headers)
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        async def receive_bounded() -> Message:
            nonlocal num_body_bytes
            message = await receive()
            if message["type"] == "http.request":
                num_body_bytes += len(message.get("body", b""))
                if num_body_bytes > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        if self.lifecycle.draining and path != "/metrics":
            await self._send_error(send_with_id, APIError(
                503, "The server is shutting down; please retry on another replica or in a moment.",
                type="server_error", code="shutting_down", headers={"retry-after": "5"}))
            return
        length = content_length(scope["headers"])
        if length is not None and length > self.max_body_bytes:
            await self._send_error(send_with_id, APIError(
                413, f"The request body has {length} bytes; this server takes at most {self.max_body_bytes}.",
                code="request_too_large"))
            return
        self.lifecycle.num_in_flight += 1
        try:
            await self.app(scope, receive_bounded, send_with_id)
        except Exception:  # noqa: BLE001 - anything that escaped the exception handlers
            logger.exception("unhandled error serving %s %s (request id %s)", scope["method"], path, request_id)
            if not started:
                await self._send_error(send_with_id, APIError(
                    500, "The server had an internal error while processing the request.", type="server_error"))
        finally:
            self.lifecycle.num_in_flight -= 1

    @staticmethod
    async def _send_error(send: Send, error: APIError) -> None:
        response = error.response()
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
