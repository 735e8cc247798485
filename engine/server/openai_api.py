"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (whole or streamed as server-sent
events, with usage, n, stop, logprobs, seed) and /v1/models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.engine import Engine
from engine.server.errors import ApiError, api_error_for, engine_errors, parse_body
from engine.server.middleware import engine_rids, request_rid
from engine.server.openai_protocol import (
    ENGINE_TO_OPENAI,
    Answer,
    ChatAnswer,
    ChatCompletionRequest,
    CompletionAnswer,
    CompletionRequest,
    SamplingFields,
)
from engine.server.service import Service
from engine.server.streaming import ClientGone, EventStream, JSONBody, collect, sse_stream, until_disconnect

_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def openai_router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> Response:
        return JSONBody({"object": "list", "data": [_model_card(service)]})

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.perf_counter()
        body = await parse_body(request, CompletionRequest)
        engine = service.require_engine()
        _check_completion_options(body)
        texts = isinstance(body.prompt, str) or (bool(body.prompt) and isinstance(body.prompt[0], str))
        prompt, input_ids = (body.prompt, None) if texts else (None, body.prompt)
        max_tokens = _COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        echo = _echo_texts(engine, body) if body.echo else None
        answer = CompletionAnswer(body, service.model_name, request_rid(request), echo)
        fields, renames = set(CompletionRequest.model_fields), {**ENGINE_TO_OPENAI, "input_ids": "prompt"}
        with engine_errors(fields, renames):
            stream = await engine.async_generate(
                prompt,
                body.sampling_params(max_tokens),
                input_ids,
                stream=True,
                rid=engine_rids(request, prompt if texts else input_ids),
                return_logprob=body.logprobs is not None,
                top_logprobs_num=body.logprobs or 0,
                return_text_in_logprobs=True,
            )
        return await _respond(service, request, body, answer, stream, started, fields, renames)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = await parse_body(request, ChatCompletionRequest)
        engine = service.require_engine()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        answer = ChatAnswer(body, service.model_name, request_rid(request))
        fields = set(ChatCompletionRequest.model_fields)
        renames = {**ENGINE_TO_OPENAI, "prompt": "messages", "image_data": "messages"}  # images come in messages
        with engine_errors(fields, renames):
            stream = await engine.async_chat(
                [m.as_template_input() for m in body.messages],
                body.sampling_params(max_tokens),
                stream=True,
                rid=request_rid(request),
                return_logprob=body.logprobs,
                top_logprobs_num=body.top_logprobs or 0,
                return_text_in_logprobs=True,
            )
        return await _respond(service, request, body, answer, stream, started, fields, renames)

    return router


def _model_card(service: Service) -> dict[str, Any]:
    engine = service.require_engine()
    return {
        "id": service.model_name,
        "object": "model",
        "created": service.started_at,
        "owned_by": "ferry",
        "max_model_len": engine.args.context_length,
    }


def _check_completion_options(body: CompletionRequest) -> None:
    """OpenAI completion options the engine does not offer: a 400 naming each."""
    if body.suffix is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported (only best_of == n)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo together with logprobs is not supported", param="echo")


def _echo_texts(engine: Engine, body: CompletionRequest) -> list[str]:
    prompt = body.prompt
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    return [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]


async def _respond(
    service: Service,
    request: Request,
    body: SamplingFields,
    answer: Answer,
    stream: AsyncIterator[dict[str, Any]],
    started: float,
    fields: set[str],
    renames: dict[str, str],
) -> Response:
    chunks = service.metrics.metered(stream, started)
    if body.stream:
        tail = (lambda: [answer.envelope([]) | {"usage": answer.usage()}]) if body.include_usage else list
        return EventStream(sse_stream(chunks, answer.chunk, lambda e: api_error_for(e, fields, renames).body(), tail))
    try:
        with engine_errors(fields, renames):
            outputs = await until_disconnect(request, collect(chunks))
    except ClientGone:
        return Response(status_code=499)
    return JSONBody(answer.whole(outputs if isinstance(outputs, list) else [outputs]))
