"""TokenizerManager: lives on the engine's own event loop; sends requests to the scheduler and routes
the detokenizer's text batches to each request's state, where callers of any thread or loop wait."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional

import zmq
import zmq.asyncio

from engine.shared.errors import EngineError
from engine.shared.ipc import Endpoints, pull_socket, push_socket
from engine.shared.protocol import (
    AbortRequest,
    Codec,
    ControlReply,
    ControlRequest,
    FrontendInput,
    GenerateBatch,
    GenerateRequest,
    ProcessError,
    ProcessReady,
    TextBatch,
)
from tokenizer_proc.request_state import ReqState

logger = logging.getLogger(__name__)

_CHILD_ROLES = ("scheduler", "detokenizer")


class TokenizerManager:
    def __init__(self, endpoints: Endpoints, token_text: Callable[[int], str]) -> None:
        self.context = zmq.asyncio.Context()
        self.receiver = pull_socket(self.context, endpoints.frontend)
        self.to_scheduler = push_socket(self.context, endpoints.scheduler)
        self.in_codec = Codec(FrontendInput)
        self.out_codec = Codec(Any)
        self.token_text = token_text
        self.states: dict[str, ReqState] = {}
        # Aborted rids whose last message has not arrived yet: it must not reach a request that
        # reuses the rid, so the rid stays taken until then.
        self.draining: set[str] = set()
        self.ready: dict[str, dict[str, Any]] = {}
        self.ready_event = asyncio.Event()
        self.error: Optional[EngineError] = None
        self.calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count()
        self.tasks = [asyncio.get_running_loop().create_task(self._receive_loop())]

    # ---- lifecycle ----

    async def wait_ready(self, child_exit_status: Callable[[], Optional[str]], timeout: float) -> dict[str, Any]:
        """Wait until both children report ready; raise the child's error if one fails first."""
        self.tasks.append(asyncio.get_running_loop().create_task(self._watch_children(child_exit_status)))
        deadline = time.monotonic() + timeout
        while not self.ready_event.is_set():
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise EngineError(f"engine processes not ready after {timeout:.0f}s (startup_timeout)")
            try:
                await asyncio.wait_for(self.ready_event.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        if self.error is not None:
            raise self.error
        return self.ready["scheduler"]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.fail_all(EngineError("the engine was shut down"))
        self.receiver.close()
        self.to_scheduler.close()
        self.context.term()

    async def _watch_children(self, child_exit_status: Callable[[], Optional[str]]) -> None:
        while True:
            await asyncio.sleep(0.2)
            status = child_exit_status()
            if status is not None:
                await asyncio.sleep(0.3)  # a dying child's own error report is more useful: let it land
                self.fail_all(EngineError(f"{status}; the engine cannot serve requests any more"))
                return

    def fail_all(self, error: EngineError) -> None:
        if self.error is None:
            self.error = error
        for state in self.states.values():
            state.fail(self.error)
        self.states.clear()
        for fut in self.calls.values():
            if not fut.done():
                fut.set_exception(self.error)
        self.ready_event.set()

    # ---- receiving ----

    async def _receive_loop(self) -> None:
        while True:
            msg = self.in_codec.decode(await self.receiver.recv())
            if isinstance(msg, TextBatch):
                self._route(msg)
            elif isinstance(msg, ProcessReady):
                self.ready[msg.role] = msg.info
                if all(role in self.ready for role in _CHILD_ROLES):
                    self.ready_event.set()
            elif isinstance(msg, ProcessError):
                self.fail_all(EngineError(f"{msg.role} process failed: {msg.message}\n{msg.traceback}"))
            elif isinstance(msg, ControlReply):
                fut = self.calls.pop(msg.call_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _route(self, batch: TextBatch) -> None:
        for i, rid in enumerate(batch.rids):
            finish = batch.finish[i]
            state = None if rid in self.draining else self.states.get(rid)
            if state is None:  # aborted by its caller; late tokens are dropped
                if finish is not None:
                    self.draining.discard(rid)
                continue
            state.add(
                batch.text_deltas[i],
                batch.new_token_ids[i],
                finish,
                batch.prompt_tokens[i],
                batch.cached_tokens[i],
                batch.extras[i],
            )
            if finish is not None:
                del self.states[rid]

    # ---- requests ----

    def submit(self, reqs: list[GenerateRequest]) -> list[ReqState]:
        if self.error is not None:
            raise self.error
        for req in reqs:
            if req.rid in self.states or req.rid in self.draining:
                raise ValueError(f"rid {req.rid!r} is in use by a running or just-aborted request")
        states = [ReqState(req, self.token_text) for req in reqs]
        for state in states:
            self.states[state.rid] = state
        self.to_scheduler.send(self.out_codec.encode(GenerateBatch(reqs=reqs)))
        return states

    def abort(self, rids: list[str]) -> None:
        live = [rid for rid in rids if rid in self.states]
        for rid in live:
            self.states.pop(rid).abort_locally()
            self.draining.add(rid)
        if live and self.error is None:
            self.to_scheduler.send(self.out_codec.encode(AbortRequest(rids=live)))

    async def wait_all(self, states: list[ReqState]) -> list[dict[str, Any]]:
        """Wait for submitted requests, in order; cancelling this coroutine aborts the unfinished ones."""
        try:
            for state in states:
                await state.wait_finished()
            return [state.result() for state in states]
        finally:
            self.abort([s.rid for s in states if not s.finished])

    async def stream(self, reqs: list[GenerateRequest], with_index: bool) -> AsyncIterator[dict[str, Any]]:
        """Yield chunks (text deltas) as they come, from all requests; closing the stream aborts them."""
        states = self.submit(reqs)
        pending = {asyncio.ensure_future(s.wait_news()): i for i, s in enumerate(states)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f]):
                    i = pending.pop(fut)
                    fut.result()
                    chunk = states[i].take_chunk()  # taken now, after the reader came back for more
                    if with_index:
                        chunk["index"] = i
                    if not states[i].chunk_is_last(chunk):
                        pending[asyncio.ensure_future(states[i].wait_news())] = i
                    yield chunk
        finally:
            for fut in pending:
                fut.cancel()
            self.abort([s.rid for s in states if not s.finished])

    async def call(self, op: str, timeout: Optional[float] = 30.0, args: Any = None) -> dict[str, Any]:
        """Ask the scheduler `op` (with a trainer op's `args`); timeout None: wait as long as it takes
        (the call still fails at once if the scheduler dies)."""
        if self.error is not None:
            raise self.error
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = fut
        self.to_scheduler.send(self.out_codec.encode(ControlRequest(call_id=call_id, op=op, args=args)))
        reply: ControlReply = await asyncio.wait_for(fut, timeout)
        if not reply.ok:
            raise EngineError(f"{op} failed: {reply.payload.get('error')}")
        return reply.payload
