"""HTTP errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, from our own checks, from
pydantic's request validation and from the engine's ValueError/TypeError (whose message names the field)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from engine.shared.errors import EngineError

logger = logging.getLogger("engine.server")

M = TypeVar("M", bound=BaseModel)

# Parts of a pydantic error location that name a union member, not a field.
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


class ApiError(Exception):
    """Raised by an endpoint; answered as an OpenAI-style error body with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        type: str = "invalid_request_error",
        code: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = status if code is None else code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def parse_body(request: Any, model: type[M]) -> M:
    """The request's JSON body checked into `model`, whatever Content-Type the client sent (curl -d says
    form-urlencoded); any problem is a 400 naming the field."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        raise from_validation_errors(list(error.errors(include_url=False))) from None


def from_validation_errors(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 naming the first bad field of a pydantic/FastAPI validation failure."""
    if not errors:
        return ApiError(400, "invalid request body")
    # A validator's own complaint (a bad image URL) says more than the other union members' type errors.
    error = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = tuple(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", error.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}", param="body")
    param = location_name(loc)
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param=param)
    if kind == "missing":
        message = f"missing required field {param!r}" if param else "missing request body"
        return ApiError(400, message, param=param or "body")
    if not param:
        return ApiError(400, f"the request body must be a JSON object: {error.get('msg', '')}", param="body")
    return ApiError(400, f"{param}: {error.get('msg', 'invalid value')}", param=param)


def location_name(loc: Iterable[Any]) -> Optional[str]:
    """("messages", 0, "content", "str") -> "messages[0].content"."""
    name = ""
    tag_next = False  # a tagged union's member is named by its tag (an image part's "image_url") after the index
    for part in loc:
        if isinstance(part, str) and "tagged-union[" in part:
            tag_next = True
            continue
        if tag_next and isinstance(part, str):
            tag_next = False
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _UNION_TAGS:
            name += f".{part}" if name else part
    return name or None


def from_engine_error(error: Exception, fields: Iterable[str], renames: Mapping[str, str]) -> ApiError:
    """A 400 for an engine ValueError/TypeError, in this endpoint's words. The engine names fields by its
    own argument names (prompt, sampling_params.max_new_tokens); `renames` maps those to the endpoint's
    names, and an endpoint without a `sampling_params` field gets the sampling fields flattened."""
    fields = set(fields)
    flatten = "sampling_params" not in fields

    def rename(name: str) -> str:
        return renames.get(name, name)

    message = str(error)
    if flatten:
        message = re.sub(r"sampling_params\.(\w+)", lambda m: rename(m.group(1)), message)
    message = re.sub(r"[A-Za-z_]\w*", lambda m: rename(m.group(0)) if m.group(0) in renames else m.group(0), message)
    return ApiError(400, message, param=_first_field(message, fields | set(renames.values())))


def _first_field(message: str, fields: set[str]) -> Optional[str]:
    dotted = re.search(r"sampling_params\.\w+", message)
    if dotted:
        return dotted.group(0)
    for word in re.findall(r"[A-Za-z_]\w*", message):
        if word in fields:
            return word
    return None


def api_error_for(error: Exception, fields: Iterable[str], renames: Mapping[str, str]) -> ApiError:
    """What the client is told about an exception from an engine call: its mistakes (ValueError/TypeError)
    are 400s in the endpoint's words; an engine failure is a 503 (its traceback goes to the log only)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (ValueError, TypeError)):
        return from_engine_error(error, fields, renames)
    if isinstance(error, EngineError):
        logger.error("engine error: %s", error)
        return ApiError(503, str(error).splitlines()[0], type="engine_error")
    logger.exception("unexpected error")
    return ApiError(500, f"internal error: {type(error).__name__}", type="internal_error")


@contextlib.contextmanager
def engine_errors(fields: Iterable[str], renames: Mapping[str, str]) -> Iterator[None]:
    """Around engine calls: raise what `api_error_for` says about their user and engine errors."""
    try:
        yield
    except (ValueError, TypeError, EngineError) as error:
        raise api_error_for(error, fields, renames) from error
