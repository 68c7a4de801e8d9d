"""The control plane's refusals; each carries the HTTP status, OpenAI error type and code it becomes."""

from tokenforge.errors import TokenforgeError


class ControlError(TokenforgeError):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AuthenticationError(ControlError):
    """No key, a malformed, unknown, revoked or expired key (401)."""

    status_code = 401
    code = "invalid_api_key"


class PermissionDeniedError(ControlError):
    """A valid key without the scope or the organisation the route needs (403)."""

    status_code = 403
    code = "insufficient_permissions"


class NotFoundError(ControlError):
    """An organisation, key or invoice that does not exist, or not for this caller (404)."""

    status_code = 404
    code = "not_found"


class QuotaExceededError(ControlError):
    """The request's worst-case cost does not fit the month's spending limit (429)."""

    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimitError(ControlError):
    """Requests or tokens per minute exceeded (429 with retry-after)."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class StoreUnavailableError(ControlError):
    """The store cannot be reached: fail closed, never serve unbilled (503)."""

    status_code = 503
    type = "server_error"
    code = "store_unavailable"
