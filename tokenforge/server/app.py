"""create_app(engine, model_name): the FastAPI app of the OpenAI-compatible API over one AsyncEngine.

Routes stay thin: they check the model name and hand the parsed body to serving_chat or
serving_completions. One served model per app for now (multi-model serving is future work).
"""

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenforge import __version__
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.errors import InvalidRequestError
from tokenforge.server.errors import install_error_handlers, model_not_found
from tokenforge.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenforge.server.middleware import DEFAULT_MAX_BODY_BYTES, RequestContextMiddleware
from tokenforge.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                        ModelList, TokenizeRequest)
from tokenforge.server.serving_chat import ChatHandler, apply_chat_template
from tokenforge.server.serving_completions import CompletionHandler


def create_app(engine: AsyncEngine, model_name: str, *, owns_engine: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The app serving `engine` as model `model_name`; `owns_engine`: shut it down with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_engine:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="tokenforge", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(engine)
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=max_body_bytes)
    chat = ChatHandler(engine, model_name, metrics)
    completions = CompletionHandler(engine, model_name, metrics)
    tokenizer = engine.core.tokenizer

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise model_not_found(model)

    def check_tokenizer() -> None:
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer (random-weight shape model)")

    def model_card() -> ModelCard:
        return ModelCard(id=model_name, max_model_len=engine.core.max_model_len)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await chat.create(body, request)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await completions.create(body, request)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> ModelCard:
        check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        check_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give either 'prompt' or 'messages'", param="prompt")
        if body.messages is not None:
            token_ids = await asyncio.to_thread(apply_chat_template, tokenizer, body.messages,
                                                body.add_generation_prompt)
        else:
            token_ids = await asyncio.to_thread(tokenizer.encode, body.prompt,
                                                add_special_tokens=body.add_special_tokens)
        return {"count": len(token_ids), "max_model_len": engine.core.max_model_len, "tokens": token_ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        check_tokenizer()
        vocab_size = engine.core.arch.vocab_size
        if any(not 0 <= t < vocab_size for t in body.tokens):
            raise InvalidRequestError(f"token ids must be in [0, {vocab_size})", param="tokens")
        # Ids of a padded embedding beyond the tokenizer's vocabulary have no text.
        num_known = len(tokenizer)
        known = [t for t in body.tokens if t < num_known]
        return {"prompt": await asyncio.to_thread(tokenizer.decode, known)}

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "error": None if engine.error is None else str(engine.error)},
                            status_code=503, headers={"retry-after": "10"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
