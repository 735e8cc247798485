"""ReqState: one request's output as it arrives, and the dicts the caller gets (whole, or as chunks).

A stream reader takes what arrived since its last chunk, merged: a reader that falls behind costs
no more than the request's own output, however slowly it reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Optional

from engine.shared.protocol import Array, FinishReason, GenerateRequest, ReqExtras

_LOGPROB_FIELDS = ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs")


class ReqState:
    def __init__(self, req: GenerateRequest, token_text: Callable[[int], str]) -> None:
        self.rid = req.rid
        self.req = req
        self.token_text = token_text
        self.created = time.perf_counter()
        self.text = ""
        self.output_ids: list[int] = []
        self.logprobs: dict[str, list] = {name: [] for name in _LOGPROB_FIELDS}
        self.hidden_states: list[Any] = []
        self.embedding: Optional[list[float]] = None
        self.finish: Optional[FinishReason] = None
        self.prompt_tokens = len(req.input_ids)
        self.cached_tokens = 0
        self.error: Optional[Exception] = None
        self.event = asyncio.Event()
        self.taken = {"text": 0, "ids": 0, "hidden": 0} | {name: 0 for name in _LOGPROB_FIELDS}

    @property
    def finished(self) -> bool:
        return self.finish is not None or self.error is not None

    def add(
        self,
        text: str,
        ids: list[int],
        finish: Optional[FinishReason],
        prompt_tokens: int,
        cached_tokens: int,
        extras: Optional[ReqExtras],
    ) -> None:
        self.text += text
        self.output_ids += ids
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        if extras is not None:
            for name in _LOGPROB_FIELDS:
                values = getattr(extras, name)
                if values:
                    self.logprobs[name] += values
            if extras.hidden_states:
                self.hidden_states += [_to_tensor(a) for a in extras.hidden_states]
            if extras.embedding is not None:
                self.embedding = _to_tensor(extras.embedding).tolist()
        self.finish = finish
        self.event.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.event.set()

    def abort_locally(self) -> None:
        """The caller gave up: nobody reads this state any more; mark it so no chunk is awaited."""
        self.finish = FinishReason(type="abort", message="aborted by the caller")
        self.event.set()

    async def wait_finished(self) -> None:
        while not self.finished:
            self.event.clear()
            await self.event.wait()
        if self.error is not None:
            raise self.error

    async def wait_news(self) -> None:
        """Wait until something arrived since the last chunk, or the request ended."""
        while not self.finished and self.taken["ids"] == len(self.output_ids) and not self._new_extras():
            self.event.clear()
            await self.event.wait()

    def take_chunk(self) -> dict[str, Any]:
        """Everything that arrived since the last chunk, merged into one chunk. Taking it only when the
        reader asks (not when it arrives) is what keeps a slow reader from piling up chunks."""
        if self.error is not None:
            raise self.error
        return self._output(delta=True)

    def chunk_is_last(self, chunk: dict[str, Any]) -> bool:
        return chunk["meta_info"]["finish_reason"] is not None

    def result(self) -> dict[str, Any]:
        if self.req.embed:  # SGLang's encode() output
            meta = {
                "id": self.rid,
                "finish_reason": self.finish.to_dict() if self.finish is not None else None,
                "prompt_tokens": self.prompt_tokens,
                "e2e_latency": time.perf_counter() - self.created,
            }
            return {"embedding": self.embedding, "meta_info": meta}
        return self._output(delta=False)

    def _new_extras(self) -> bool:
        return self.taken["hidden"] < len(self.hidden_states) or any(
            self.taken[name] < len(self.logprobs[name]) for name in _LOGPROB_FIELDS
        )

    def _take(self, key: str, values: Any, delta: bool) -> Any:
        start = self.taken[key] if delta else 0
        self.taken[key] = len(values)
        return values[start:]

    def _output(self, delta: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish.to_dict() if self.finish is not None else None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.req.return_logprob:
            for name in _LOGPROB_FIELDS:
                if "top" in name and not self.req.top_logprobs_num:
                    continue
                meta[name] = self._with_text(name, self._take(name, self.logprobs[name], delta))
        if self.req.return_hidden_states:
            meta["hidden_states"] = self._take("hidden", self.hidden_states, delta)
        return {
            "text": self._take("text", self.text, delta),
            "output_ids": self._take("ids", self.output_ids, delta),
            "meta_info": meta,
        }

    def _with_text(self, name: str, entries: list) -> list:
        text = self.token_text if self.req.return_text_in_logprobs else (lambda _: None)
        if "top" in name:
            return [[(lp, t, text(t)) for lp, t in position] for position in entries]
        return [(lp, t, text(t)) for lp, t in entries]


def _to_tensor(array: Array) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(array.data, dtype=array.dtype).reshape(array.shape).copy())
