"""TokenizerManager: lives on the engine's own event loop; sends requests to the scheduler (one of the
replicas when dp_size > 1: replicas.py) and routes the detokenizer's text batches to each request's
state, where callers of any thread or loop wait."""

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
from engine.shared.ipc import Endpoints, pull_socket
from engine.shared.protocol import (
    Codec,
    ControlReply,
    ControlRequest,
    FrontendInput,
    GenerateRequest,
    ProcessError,
    ProcessReady,
    TextBatch,
)
from tokenizer_proc.replica_replies import args_for_replica, merge_replies, merge_server_info
from tokenizer_proc.replicas import Replicas
from tokenizer_proc.request_state import ReqState

logger = logging.getLogger(__name__)

# A child's exit as the process watcher reports it: its scheduler replica (None: the detokenizer) and why.
ChildExit = tuple[Optional[int], str]


class TokenizerManager:
    def __init__(
        self, endpoints: Endpoints, token_text: Callable[[int], str], dp_size: int = 1, tp_size: int = 1
    ) -> None:
        self.context = zmq.asyncio.Context()
        self.receiver = pull_socket(self.context, endpoints.frontend)
        self.replicas = Replicas(self.context, endpoints, dp_size)
        self.tp_size = tp_size
        self.in_codec = Codec(FrontendInput)
        self.token_text = token_text
        self.states: dict[str, ReqState] = {}
        # Aborted rids whose last message has not arrived yet: it must not reach a request that
        # reuses the rid, so the rid stays taken until then.
        self.draining: set[str] = set()
        self.ready: dict[int, dict[str, Any]] = {}  # each scheduler replica's info, once it is ready
        self.detokenizer_ready = False
        self.ready_event = asyncio.Event()
        self.error: Optional[EngineError] = None
        self.calls: dict[int, tuple[asyncio.Future, int]] = {}  # call_id -> (its reply, the replica asked)
        self.call_ids = itertools.count()
        self.tasks = [asyncio.get_running_loop().create_task(self._receive_loop())]

    # ---- lifecycle ----

    async def wait_ready(self, child_exits: Callable[[], list[ChildExit]], timeout: float) -> dict[str, Any]:
        """Wait until every child reports ready; raise the child's error if one fails first. Returns the
        schedulers' server info (merged over replicas)."""
        self.tasks.append(asyncio.get_running_loop().create_task(self._watch_children(child_exits)))
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
        return merge_server_info(self.ready, [self.replicas.load_info(r) for r in range(self.replicas.size)])

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.fail_all(EngineError("the engine was shut down"))
        self.receiver.close()
        self.replicas.close()
        self.context.term()

    async def _watch_children(self, child_exits: Callable[[], list[ChildExit]]) -> None:
        while self.error is None:
            await asyncio.sleep(0.2)
            exits = child_exits()
            if exits:
                await asyncio.sleep(0.3)  # a dying child's own error report is more useful: let it land
            for replica, status in exits:  # status names the process: "the scheduler replica 1 process exited..."
                if replica is None or self.replicas.size == 1:
                    self.fail_all(EngineError(f"{status}; the engine cannot serve requests any more"))
                else:
                    self.lose_replica(replica, status)

    def lose_replica(self, replica: int, message: str) -> None:
        """Scheduler replica `replica` (dp_size > 1) is gone: fail the callers waiting on it at once. The
        other replicas go on serving; with none left (or before start-up is done) the engine fails."""
        if self.replicas.errors[replica] is not None:
            return  # its own error report came first
        error = EngineError(message)
        rids = self.replicas.lose(replica, message.splitlines()[0])
        if not self.replicas.live():
            self.fail_all(EngineError(f"{message}\nno scheduler replica is left; the engine cannot serve requests"))
            return
        if not self.ready_event.is_set():
            self.fail_all(error)
            return
        logger.error(
            "%s; its %d requests failed, %d replicas go on serving", message, len(rids), len(self.replicas.live())
        )
        for rid in rids:
            self.draining.discard(rid)
            state = self.states.pop(rid, None)
            if state is not None:
                state.fail(error)
        for fut, asked in self.calls.values():
            if asked == replica and not fut.done():
                fut.set_exception(error)

    def fail_all(self, error: EngineError) -> None:
        if self.error is None:
            self.error = error
        for state in self.states.values():
            state.fail(self.error)
        self.states.clear()
        for fut, _ in self.calls.values():
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
                if msg.role == "detokenizer":
                    self.detokenizer_ready = True
                else:
                    self.ready[msg.dp_rank] = msg.info
                if self.detokenizer_ready and len(self.ready) == self.replicas.size:
                    self.ready_event.set()
            elif isinstance(msg, ProcessError):
                message = f"{msg.role} process failed: {msg.message}\n{msg.traceback}"
                if msg.role == "detokenizer" or self.replicas.size == 1:
                    self.fail_all(EngineError(message))
                else:
                    self.lose_replica(msg.dp_rank, f"scheduler replica {msg.dp_rank}: {message}")
            elif isinstance(msg, ControlReply):
                fut, _ = self.calls.pop(msg.call_id, (None, 0))
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _route(self, batch: TextBatch) -> None:
        for i, rid in enumerate(batch.rids):
            finish = batch.finish[i]
            state = None if rid in self.draining else self.states.get(rid)
            if state is None:  # aborted by its caller; late tokens are dropped
                if finish is not None:
                    self.draining.discard(rid)
                    self.replicas.finished(rid)
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
                self.replicas.finished(rid)

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
        self.replicas.send(reqs)
        return states

    def abort(self, rids: list[str]) -> None:
        live = [rid for rid in rids if rid in self.states]
        for rid in live:
            self.states.pop(rid).abort_locally()
            self.draining.add(rid)
        if live and self.error is None:
            self.replicas.abort(live)

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
        """Ask every live scheduler replica `op` (with a trainer op's `args`) and merge their answers
        (replica_replies.py); timeout None: wait as long as it takes (the call still fails at once if a
        replica asked dies)."""
        if self.error is not None:
            raise self.error
        live = self.replicas.live()
        asked = [self._ask(r, op, args_for_replica(args, r, self.tp_size)) for r in live]
        replies: list[ControlReply] = await asyncio.wait_for(asyncio.gather(*asked), timeout)
        for reply in replies:
            if not reply.ok:
                raise EngineError(f"{op} failed: {reply.payload.get('error')}")
        answers = {r: reply.payload for r, reply in zip(live, replies)}
        if op == "server_info":
            return merge_server_info(answers, [self.replicas.load_info(r) for r in range(self.replicas.size)])
        return merge_replies(op, answers)

    def _ask(self, replica: int, op: str, args: Any) -> asyncio.Future:
        call_id = next(self.call_ids)
        fut = asyncio.get_running_loop().create_future()
        self.calls[call_id] = (fut, replica)
        self.replicas.send_call(replica, ControlRequest(call_id=call_id, op=op, args=args))
        return fut
