"""Typed errors for bad user input and engine failures; the server maps them to HTTP statuses."""


class TokenforgeError(Exception):
    """Base class of every error tokenforge raises on purpose."""


class InvalidRequestError(TokenforgeError, ValueError):
    """The caller asked for something invalid (becomes a 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(TokenforgeError, LookupError):
    """An unknown model name or a path that does not exist (becomes a 404)."""


class ModelFileError(TokenforgeError):
    """A model file exists but cannot be read: wrong format, truncated, bad checksum."""


class EngineDeadError(TokenforgeError, RuntimeError):
    """The engine loop has died; requests cannot be served (becomes a 503)."""


class EngineStepError(TokenforgeError, RuntimeError):
    """A step failed while running this request; the engine ended the step's requests and went on
    (becomes a 503: a retry is served by the recovered engine)."""


class QueueFullError(TokenforgeError):
    """The waiting queue is at its bound; the caller should retry later (becomes a 503)."""


class ConfigError(TokenforgeError):
    """A config file or a set of command-line options that cannot work (the CLI exits with 1)."""
