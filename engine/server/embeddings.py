"""POST /v1/embeddings, OpenAI's embeddings API, answered by Engine.async_encode on an engine started with
is_embedding=True (`ferry-serve --model-path ... --is-embedding`). The official client asks for base64
(little-endian float32) unless told "float"; both are answered."""

from __future__ import annotations

import base64
from typing import Any, Literal, Optional, Union

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from engine.server.errors import ApiError, engine_errors, parse_body
from engine.server.middleware import engine_rids
from engine.server.service import Service
from engine.server.streaming import JSONBody

_RENAMES = {"prompt": "input", "input_ids": "input"}  # the engine's argument names -> this endpoint's


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Union[str, list[str], list[int], list[list[int]]] = Field(min_length=1)
    model: Optional[str] = None  # any name or none: there is one model, answered under its served name
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


def embeddings_router(service: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await parse_body(request, EmbeddingRequest)
        engine = service.require_engine()
        if body.dimensions is not None:
            raise ApiError(
                400, "dimensions is not supported: the model's full embedding is returned", param="dimensions"
            )
        texts = isinstance(body.input, str) or isinstance(body.input[0], str)
        prompt, input_ids = (body.input, None) if texts else (None, body.input)
        with engine_errors(set(EmbeddingRequest.model_fields), _RENAMES):
            outputs = await engine.async_encode(prompt, input_ids, rid=engine_rids(request, body.input))
        outputs = outputs if isinstance(outputs, list) else [outputs]
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(out["embedding"], body.encoding_format)}
            for i, out in enumerate(outputs)
        ]
        tokens = sum(out["meta_info"]["prompt_tokens"] for out in outputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONBody({"object": "list", "data": data, "model": service.model_name, "usage": usage})

    return router


def _encoded(embedding: Optional[list[float]], encoding_format: str) -> Any:
    if embedding is None:  # the request was aborted (the engine said why in its log)
        raise ApiError(500, "the embedding was not computed", type="internal_error")
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode()
