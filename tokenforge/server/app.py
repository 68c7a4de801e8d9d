"""create_app({served name: engine}): the FastAPI app of the OpenAI-compatible API over one or more
AsyncEngines, routing each request to the engine its `model` field names.

Routes stay thin: they pick the model (served_models.py) and hand the parsed body to its
serving_chat or serving_completions handler.
"""

import asyncio
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenforge import __version__
from tokenforge.control.plane import ControlPlane
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.errors import InvalidRequestError
from tokenforge.server.admin import make_admin_router
from tokenforge.server.billing import Billing
from tokenforge.server.errors import RETRY_AFTER_DEAD_S, install_error_handlers
from tokenforge.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenforge.server.middleware import DEFAULT_MAX_BODY_BYTES, Lifecycle, RequestContextMiddleware
from tokenforge.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                        ModelList, TokenizeRequest)
from tokenforge.server.served_models import ServedModel, ServedModels
from tokenforge.server.serving_chat import apply_chat_template
from tokenforge.server.serving_completions import encode_text


def create_app(engines: Mapping[str, AsyncEngine], *, owns_engines: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, control: ControlPlane | None = None,
               auth_required: bool = False) -> FastAPI:
    """The app serving each engine under its name; `owns_engines`: shut them (and `control`) down
    with the app. With a control plane every request is metered and limited, and `auth_required`
    makes inference routes need a key; without one, nothing is metered (tests, benchmarks)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if billing is not None:
            await billing.drain(timeout_s=5.0)
        if owns_engines:
            await asyncio.gather(*(asyncio.to_thread(engine.shutdown) for engine in engines.values()))
            if control is not None:
                control.close()

    app = FastAPI(title="tokenforge", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(engines)
    billing = Billing(control, auth_required) if control is not None else None
    models = ServedModels(engines, metrics, billing)
    app.state.models = models
    app.state.metrics = metrics
    install_error_handlers(app)
    app.state.lifecycle = Lifecycle()
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=max_body_bytes,
                       lifecycle=app.state.lifecycle)

    def inference_key(count: bool) -> list:
        """The key check of inference routes; `count`: count the request now (generation routes are
        counted with their tokens at admission)."""
        async def check(request: Request) -> None:
            if billing is not None:
                await billing.authorize(request, "inference", count=count)
        return [Depends(check)]

    generation, inference = inference_key(count=False), inference_key(count=True)
    if billing is not None:
        app.include_router(make_admin_router(billing))

    def tokenizer_of(model: ServedModel):
        tokenizer = model.engine.core.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer (random-weight shape model)")
        return tokenizer

    @app.post("/v1/chat/completions", dependencies=generation)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await models.get(body.model).chat.create(body, request)

    @app.post("/v1/completions", dependencies=generation)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await models.get(body.model).completions.create(body, request)

    @app.get("/v1/models", dependencies=inference)
    async def list_models() -> ModelList:
        return ModelList(data=[model.card() for model in models])

    @app.get("/v1/models/{model:path}", dependencies=inference)
    async def retrieve_model(model: str) -> ModelCard:
        return models.get(model).card()

    @app.post("/tokenize", dependencies=inference)
    async def tokenize(body: TokenizeRequest) -> dict:
        model = models.get(body.model)
        tokenizer = tokenizer_of(model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give either 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            token_ids = await asyncio.to_thread(apply_chat_template, tokenizer, body.messages,
                                                body.add_generation_prompt)
        else:
            token_ids = await asyncio.to_thread(encode_text, tokenizer, body.prompt,
                                                add_special_tokens=body.add_special_tokens)
        return {"count": len(token_ids), "max_model_len": model.engine.core.max_model_len, "tokens": token_ids}

    @app.post("/detokenize", dependencies=inference)
    async def detokenize(body: DetokenizeRequest) -> dict:
        model = models.get(body.model)
        tokenizer = tokenizer_of(model)
        vocab_size = model.engine.core.arch.vocab_size
        if any(not 0 <= t < vocab_size for t in body.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", param="tokens")
        # Ids of a padded embedding beyond the tokenizer's vocabulary have no text.
        num_known = len(tokenizer)
        known = [t for t in body.tokens if t < num_known]
        return {"prompt": await asyncio.to_thread(tokenizer.decode, known)}

    @app.get("/health")
    async def health() -> Response:
        """200 only while every model's engine loop is alive and stepping; the body says which is not."""
        per_model = {model.name: model.health() for model in models}
        if models.is_healthy:
            return JSONResponse({"status": "ok", "models": per_model})
        return JSONResponse({"status": "unhealthy", "models": per_model}, status_code=503,
                            headers={"retry-after": str(RETRY_AFTER_DEAD_S)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
