"""The scheduler's event loop: receive requests, pick the next step's tokens, run it, send the tokens.

Every step is one forward pass over all running requests: decoding requests add one token each and
requests still prefilling add a chunk of their prompt, so long prompts never stall decoding.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections import deque
from typing import Any, Optional

import zmq

from engine.args import EngineArgs
from engine.ipc import Endpoints, pull_socket, push_socket
from engine.protocol import (
    AbortRequest,
    Codec,
    ControlReply,
    ControlRequest,
    FinishReason,
    GenerateBatch,
    ProcessReady,
    SchedulerInput,
    TokenBatch,
)
from scheduler_proc.finish import FinishChecker
from scheduler_proc.model_runner import ModelRunner
from scheduler_proc.request import Request
from scheduler_proc.step import Step, build_step, read_step_outputs

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, args: EngineArgs, endpoints: Endpoints, context: zmq.Context) -> None:
        self.args = args
        self.runner = ModelRunner(args)
        self.pool = self.runner.pool
        self.finish_checker = FinishChecker(args)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in arrival order
        self.rng = random.Random(args.random_seed)
        self._finished: list[Request] = []  # finished since the last TokenBatch
        self.receiver = pull_socket(context, endpoints.scheduler)
        self.to_detokenizer = push_socket(context, endpoints.detokenizer)
        self.to_frontend = push_socket(context, endpoints.frontend)
        self.in_codec = Codec(SchedulerInput)
        self.out_codec = Codec(Any)
        limit = args.chunked_prefill_size if args.chunked_prefill_size > 0 else None
        self.step_prefill_tokens = min(args.max_prefill_tokens, limit) if limit else args.max_prefill_tokens
        self.chunking = limit is not None

    # ---- the loop ----

    def run_forever(self) -> None:
        self.to_frontend.send(self.out_codec.encode(ProcessReady(role="scheduler", info=self.server_info())))
        while True:
            self.receive(block=not (self.waiting or self.running))
            step = self.schedule()
            if step is not None:
                self.run_step(step)

    def receive(self, block: bool) -> None:
        flags = 0 if block else zmq.NOBLOCK
        while True:
            try:
                data = self.receiver.recv(flags)
            except zmq.Again:
                return
            self.handle(self.in_codec.decode(data))
            flags = zmq.NOBLOCK

    def handle(self, msg: Any) -> None:
        if isinstance(msg, GenerateBatch):
            for req in msg.reqs:
                seed = req.sampling.seed if req.sampling.seed is not None else self.rng.getrandbits(62)
                self.waiting.append(Request(req, seed))
        elif isinstance(msg, AbortRequest):
            self.abort(set(msg.rids), "aborted by the caller")
        elif isinstance(msg, ControlRequest):
            self.to_frontend.send(self.out_codec.encode(self.control(msg)))

    def control(self, msg: ControlRequest) -> ControlReply:
        if msg.op == "server_info":
            return ControlReply(call_id=msg.call_id, ok=True, payload=self.server_info())
        return ControlReply(call_id=msg.call_id, ok=False, payload={"error": f"unknown op {msg.op!r}"})

    def server_info(self) -> dict[str, Any]:
        return self.runner.info() | {
            "kv_free_tokens": self.pool.num_free_slots(),
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
        }

    # ---- scheduling ----

    def schedule(self) -> Optional[Step]:
        """Every running request gets its next tokens; waiting requests join while KV and budget allow."""
        entries: list[tuple[Request, int]] = []
        budget = self.step_prefill_tokens
        for req in self.running:
            if req.prefilling:
                n = min(len(req.input_ids) - req.kv_len, budget) if self.chunking else len(req.input_ids) - req.kv_len
                if n > 0:
                    entries.append((req, n))
                    budget -= n
            else:
                entries.append((req, 1))
        reserved = sum(r.kv_still_needed() for r in self.running)
        while self.waiting and budget > 0 and self.pool.num_free_rows() > 0:
            req = self.waiting[0]
            need = req.kv_still_needed()
            if need > self.pool.capacity:
                self.waiting.popleft()
                self.finish(req, FinishReason(type="abort", message=(
                    f"prompt ({len(req.input_ids)} tokens) + max_new_tokens ({req.sampling.max_new_tokens}) "
                    f"exceeds the KV pool ({self.pool.capacity} tokens)")))  # fmt: skip
                continue
            if self.pool.num_free_slots() - reserved < need:
                break  # admitted requests may still need all their reserved slots
            if not self.chunking and entries and len(req.input_ids) > budget:
                break
            self.waiting.popleft()
            req.row = self.pool.alloc_row()
            self.runner.sampling.admit(req.row, req.sampling, req.seed, req.input_ids)
            self.running.append(req)
            reserved += need
            n = min(len(req.input_ids), budget) if self.chunking else len(req.input_ids)
            entries.append((req, n))
            budget -= n
        self.flush_outputs()  # requests refused at admission
        if not entries:
            return None
        return build_step(entries, self.pool, self.finish_checker.eos_ids)

    # ---- running a step ----

    def run_step(self, step: Step) -> None:
        for req, n in step.entries:
            req.kv_len += n  # the step's slots are in req_to_token now, whatever happens next
        try:
            hidden, logits = self.runner.forward(step.batch)
            next_ids = read_step_outputs(step, hidden, logits, self.runner)
        except Exception as exc:  # one bad step fails its requests, not the engine
            logger.error("step failed: %s", traceback.format_exc())
            message = f"internal error: {type(exc).__name__}: {exc}"
            for req, _ in step.entries:
                if req.finish is None:
                    self.finish(req, FinishReason(type="abort", message=message))
            self.flush_outputs()
            return
        for (req, _), token in zip(step.entries, next_ids):
            if token is None:
                if not req.prefilling and req.sampling.max_new_tokens == 0:
                    self.finish(req, FinishReason(type="length", matched=None))
                continue
            req.output_ids.append(token)
            req.new_ids.append(token)
            reason = self.finish_checker.check(req)
            if reason is not None:
                self.finish(req, reason)
        self.flush_outputs(step)

    def finish(self, req: Request, reason: FinishReason) -> None:
        req.finish = reason
        if req.row is not None:
            self.pool.free_slots(self.pool.req_to_token[req.row, : req.kv_len])
            self.pool.free_row(req.row)
            req.row = None
        self._finished.append(req)

    def abort(self, rids: set[str], message: str) -> None:
        for req in [r for r in self.waiting if r.rid in rids]:
            self.waiting.remove(req)
            self.finish(req, FinishReason(type="abort", message=message))
        for req in self.running:
            if req.rid in rids and req.finish is None:
                self.finish(req, FinishReason(type="abort", message=message))
        self.flush_outputs()

    def flush_outputs(self, step: Optional[Step] = None) -> None:
        """One TokenBatch for every request with news: new tokens, extras, or a finish."""
        reqs = [r for r, _ in step.entries if r.new_ids or r.extras or r.finish] if step else []
        seen = {id(r) for r in reqs}
        reqs += [r for r in self._finished if id(r) not in seen]
        self._finished = []
        if any(r.finish is not None for r in self.running):
            self.running = [r for r in self.running if r.finish is None]
        if not reqs:
            return
        new_specs = [r.detokenize_spec() for r in reqs if not r.announced]
        batch = TokenBatch(
            rids=[r.rid for r in reqs],
            new_token_ids=[r.new_ids for r in reqs],
            finish=[r.finish for r in reqs],
            prompt_tokens=[len(r.input_ids) for r in reqs],
            cached_tokens=[r.cached_tokens for r in reqs],
            extras=[r.extras for r in reqs],
            new_specs=new_specs,
        )
        for r in reqs:
            r.announced, r.new_ids, r.extras = True, [], None
        self.to_detokenizer.send(self.out_codec.encode(batch))


def run_scheduler(args: EngineArgs, endpoints: Endpoints, context: zmq.Context) -> None:
    Scheduler(args, endpoints, context).run_forever()
