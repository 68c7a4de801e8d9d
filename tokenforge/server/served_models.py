"""The models one server serves: served name -> AsyncEngine and its request handlers, and the
routing of a request's `model` field to one of them (404 unknown, 400 missing when several)."""

from collections.abc import Mapping
from dataclasses import dataclass

from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.server.billing import Billing
from tokenforge.server.errors import APIError, model_not_found
from tokenforge.server.metrics import ServerMetrics
from tokenforge.server.protocol import ModelCard
from tokenforge.server.serving_chat import ChatHandler
from tokenforge.server.serving_completions import CompletionHandler


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    chat: ChatHandler
    completions: CompletionHandler

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, max_model_len=self.engine.core.max_model_len)

    def health(self) -> dict:
        if self.engine.is_healthy:
            return {"status": "ok"}
        error = self.engine.error
        return {"status": "unhealthy", "error": None if error is None else str(error)}


class ServedModels:
    def __init__(self, engines: Mapping[str, AsyncEngine], metrics: ServerMetrics, billing: Billing | None = None):
        if not engines:
            raise ValueError("a server needs at least one model")
        self.models = {name: ServedModel(name, engine, ChatHandler(engine, name, metrics, billing),
                                         CompletionHandler(engine, name, metrics, billing))
                       for name, engine in engines.items()}

    def __iter__(self):
        return iter(self.models.values())

    def get(self, name: str | None) -> ServedModel:
        """The model a request names; a request without `model` gets the only one, if there is one."""
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise APIError(400, "Missing required parameter: 'model'.", param="model")
        try:
            return self.models[name]
        except KeyError:
            raise model_not_found(name) from None

    @property
    def is_healthy(self) -> bool:
        return all(model.engine.is_healthy for model in self)
