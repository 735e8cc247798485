"""Bodies the server sends: JSON (msgspec; tensors become lists, NaN and inf become null), server-sent
events from an engine stream, and an engine stream merged back into whole outputs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Optional, TypeVar, Union

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Send

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


def _encode_extra(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # torch tensors (hidden states) and numpy arrays
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_encode_extra)


def to_json(obj: Any) -> bytes:
    return _encoder.encode(obj)


def sse_event(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


class JSONBody(Response):
    """A JSON response encoded by msgspec (the engine's outputs hold tuples and tensors)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return to_json(content)


class EventStream(StreamingResponse):
    """Server-sent events. The body iterator is closed however the response ends (done, client gone,
    server stopping), so an unfinished engine request is aborted at once, not when it is garbage collected."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


Chunk = dict[str, Any]


async def sse_stream(
    chunks: AsyncIterator[Chunk],
    render: Callable[[Chunk], Optional[Chunk]],
    on_error: Callable[[Exception], Chunk],
    tail: Callable[[], list[Chunk]] = list,
) -> AsyncIterator[bytes]:
    """Server-sent events: `render(chunk)` of each engine chunk (None skips it), the `tail()` events, then
    [DONE]. An exception mid-stream (the response has started: no status code left to use) is sent as
    the `on_error(exception)` event before [DONE]."""
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                event = render(chunk)
                if event is not None:
                    yield sse_event(event)
        for event in tail():
            yield sse_event(event)
    except Exception as error:
        yield sse_event(on_error(error))
    yield SSE_DONE


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(stream: AsyncIterator[dict[str, Any]]) -> Union[dict[str, Any], list[dict[str, Any]]]:
    """Consume an engine stream; return what `Engine.generate` would: one dict, or a list in prompt
    order when the chunks carry an "index"."""
    by_index: dict[int, list[dict[str, Any]]] = {}
    indexed = False
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            indexed = indexed or "index" in chunk
            by_index.setdefault(chunk.get("index", 0), []).append(chunk)
    outputs = [merge_chunks(by_index[i]) for i in sorted(by_index)]
    return outputs if indexed else outputs[0]


def merge_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """One request's stream chunks (deltas) as its whole output: texts and lists concatenated, the rest
    (finish_reason, token counts, latency) from the last chunk."""
    meta = dict(chunks[-1]["meta_info"])
    for key, value in meta.items():
        if isinstance(value, list):
            meta[key] = [item for chunk in chunks for item in chunk["meta_info"][key]]
    return {
        "text": "".join(chunk["text"] for chunk in chunks),
        "output_ids": [token for chunk in chunks for token in chunk["output_ids"]],
        "meta_info": meta,
    }
