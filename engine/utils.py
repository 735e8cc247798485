"""Helpers from the SGLang offline-engine docs: merge a stream of chunks into text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


def stream_and_merge(llm: Any, prompt: str, sampling_params: dict[str, Any] | None) -> str:
    """Stream one prompt and return the whole text (chunks are deltas, so merging is concatenation)."""
    return "".join(chunk["text"] for chunk in llm.generate(prompt, sampling_params, stream=True))


async def async_stream_and_merge(llm: Any, prompt: str, sampling_params: dict[str, Any] | None) -> AsyncIterator[str]:
    """Yield each new piece of text of one prompt as it is generated."""
    stream = await llm.async_generate(prompt, sampling_params, stream=True)
    async for chunk in stream:
        yield chunk["text"]
