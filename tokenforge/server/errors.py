"""Errors in OpenAI's shape {"error": {"message", "type", "param", "code"}} and the handlers that
map every failure to one: 400 bad input (FastAPI's 422 included), 404 unknown model or route,
413 body too large, 503 with retry-after when the engine is full or down, 500 otherwise.
"""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenforge.control.errors import ControlError, StoreUnavailableError
from tokenforge.errors import EngineDeadError, EngineStepError, InvalidRequestError, QueueFullError

logger = logging.getLogger(__name__)

RETRY_AFTER_FULL_S = 1  # the queue drains within seconds
RETRY_AFTER_DEAD_S = 10  # a dead engine needs a restart: send the client elsewhere for a while
RETRY_AFTER_STORE_S = 5  # the store is down: fail closed until it is back


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status_code: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = _encodable(message)
        self.type = type
        self.param = None if param is None else _encodable(param)
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def _encodable(text: str) -> str:
    """`text` with what UTF-8 cannot encode (a lone surrogate, which JSON's "\\ud800" lets a client
    send and an error message may echo) replaced by "?", so that the error response can be sent."""
    return text.encode("utf-8", "replace").decode("utf-8")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def to_api_error(exc: BaseException) -> APIError:
    """Maps an exception raised while serving a request to the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, ControlError):
        headers = dict(getattr(exc, "headers", None) or {})
        if isinstance(exc, StoreUnavailableError):
            logger.error("the control plane's store is unavailable: %s", exc)
            exc = StoreUnavailableError("The server cannot reach its usage store, so it serves nothing for now "
                                        "(it never serves unbilled). Please retry later.")
            headers["retry-after"] = str(RETRY_AFTER_STORE_S)
        return APIError(exc.status_code, str(exc), type=exc.type, param=exc.param, code=exc.code,
                        headers=headers or None)
    if isinstance(exc, QueueFullError):
        return APIError(503, "The server is overloaded: its request queue is full. Please retry later.",
                        type="server_error", code="overloaded", headers={"retry-after": str(RETRY_AFTER_FULL_S)})
    if isinstance(exc, EngineStepError):
        return APIError(503, f"The engine failed while running this request and has recovered; please retry. ({exc})",
                        type="server_error", code="engine_step_failed", headers={"retry-after": str(RETRY_AFTER_FULL_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not available: {exc}", type="server_error", code="engine_unavailable",
                        headers={"retry-after": str(RETRY_AFTER_DEAD_S)})
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError(500, "The server had an internal error while processing the request.", type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    errors = exc.errors()
    # Of a union's errors, the one that got furthest into the input says the most
    # (an image part: "type should be 'text'", not "content should be a string").
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = _param_path(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. (The request body must be valid "
                        "JSON; see https://platform.openai.com/docs/api-reference)")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing" and param is None:
        return APIError(400, "The request needs a JSON body.")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    if param is not None and param.startswith("prompt") and len(errors) > 1:
        return APIError(400, f"Invalid value for 'prompt': it must be {_PROMPT_FORMS}.", param="prompt")
    message = first.get("msg", "invalid request")
    return APIError(400, f"Invalid value for '{param}': {message}" if param else message, param=param)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})
_PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _param_path(loc: list) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = str(part)
        elif part in _UNION_TAGS or "[" in part or "-" in part:
            continue  # pydantic's union member tags ("str", "list[int]", "function-after[...]") are not fields
        else:
            path += f".{part}"
    return path


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(exc.status_code, message, type=kind, code=code, headers=exc.headers).response()

    async def on_tokenforge(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for cls in (InvalidRequestError, QueueFullError, EngineDeadError, EngineStepError, ControlError):
        app.add_exception_handler(cls, on_tokenforge)
