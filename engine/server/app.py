"""The FastAPI app: its lifespan (the engine is up before the server accepts a connection and goes down
after the last request), error handlers, and the native endpoints: /generate (Engine.generate's JSON),
/health, /get_server_info, /flush_cache, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from engine.server.embeddings import embeddings_router
from engine.server.errors import ApiError, api_error_for, engine_errors, parse_body
from engine.server.middleware import RequestContext, engine_rids
from engine.server.openai_api import openai_router
from engine.server.openai_protocol import check_image_url
from engine.server.service import Service
from engine.server.streaming import ClientGone, EventStream, JSONBody, collect, sse_stream, until_disconnect

_HEALTH_TIMEOUT_S = 10.0
_GENERATE_RENAMES = {"prompt": "text"}  # the engine's argument names -> /generate's field names


class GenerateRequest(BaseModel):
    """POST /generate: Engine.generate's arguments as JSON (the prompt is "text", as in SGLang)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: Union[str, list[str], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: Union[dict[str, Any], list[dict[str, Any]], None] = None
    rid: Union[str, list[str], None] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int], None] = None
    top_logprobs_num: Union[int, list[int], None] = None
    return_text_in_logprobs: bool = False
    return_hidden_states: Optional[bool] = None
    image_data: Union[str, list[Union[str, list[str], None]], None] = None  # data: or http(s) URLs

    @field_validator("image_data")
    @classmethod
    def _check_image_data(cls, value: Any) -> Any:
        for entry in value if isinstance(value, list) else [value]:
            for url in entry if isinstance(entry, list) else [entry]:
                if url is not None:
                    check_image_url(url)
        return value


def build_app(service: Service) -> FastAPI:
    """The app around `service`; its lifespan starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="ferry", lifespan=lifespan)
    _add_error_handlers(app)
    _add_native_routes(app, service)
    openai, embeddings = openai_router(service), embeddings_router(service)
    app.include_router(openai)
    app.include_router(embeddings)
    routes = [*app.routes, *openai.routes, *embeddings.routes]
    known_paths = {route.path for route in routes if isinstance(getattr(route, "path", None), str)}
    app.add_middleware(
        RequestContext, api_key=service.settings.api_key, metrics=service.metrics, known_paths=known_paths
    )
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return JSONBody(error.body(), status_code=error.status)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(error.status_code, str(error.detail), type=kind))

    async def unexpected(request: Request, error: Exception) -> Response:
        return await api_error(request, api_error_for(error, (), {}))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _add_native_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> Response:
        """200 only when the engine answers (a supervisor or load balancer waits on this)."""
        try:
            await asyncio.wait_for(service.server_info(), _HEALTH_TIMEOUT_S)
        except Exception as error:
            message = (str(error).splitlines() or [type(error).__name__])[0]  # TimeoutError has no message
            return JSONBody({"status": "unavailable", "message": message}, status_code=503)
        return JSONBody({"status": "ok"})

    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        with engine_errors((), {}):
            return JSONBody(await service.server_info())

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        """Empty the engine's prefix cache; {"ok", "message"}, 400 when the engine refuses."""
        engine = service.require_engine()
        if not hasattr(engine, "flush_cache"):
            raise ApiError(501, "this engine version cannot flush its cache", type="not_implemented")
        with engine_errors((), {}):
            result = await asyncio.to_thread(engine.flush_cache)
        if not isinstance(result, dict):
            result = {"ok": bool(result), "message": ""}
        return JSONBody(result, status_code=200 if result.get("ok") else 400)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            info: Optional[dict[str, Any]] = await asyncio.wait_for(service.server_info(), _HEALTH_TIMEOUT_S)
        except Exception:
            info = None
        return PlainTextResponse(service.metrics.render(info), media_type="text/plain; version=0.0.4")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        """Engine.generate over HTTP: the same dicts, streamed as server-sent events when "stream" is true."""
        started = time.perf_counter()
        body = await parse_body(request, GenerateRequest)
        engine = service.require_engine()
        kwargs = body.model_dump(exclude={"text", "stream"})
        if kwargs["rid"] is None and (body.text is None) != (body.input_ids is None):
            kwargs["rid"] = engine_rids(request, body.text if body.text is not None else body.input_ids)
        fields = set(GenerateRequest.model_fields)
        with engine_errors(fields, _GENERATE_RENAMES):
            stream = await engine.async_generate(body.text, stream=True, **kwargs)
        chunks = service.metrics.metered(stream, started)
        if body.stream:
            on_error = lambda error: api_error_for(error, fields, _GENERATE_RENAMES).body()  # noqa: E731
            return EventStream(sse_stream(chunks, lambda chunk: chunk, on_error))
        try:
            with engine_errors(fields, _GENERATE_RENAMES):
                return JSONBody(await until_disconnect(request, collect(chunks)))
        except ClientGone:
            return Response(status_code=499)
