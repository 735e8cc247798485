"""The scheduler's answers to control calls, between two steps: server info, flushing the prefix cache,
and a trainer's calls (weight updates and memory release, which trainer_ops.py runs)."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

import msgspec

from engine.shared.args import EngineArgs
from engine.shared.protocol import ControlRequest
from engine.shared.weight_protocol import ReleaseMemory, TrainerOp
from scheduler_proc.cache_manager import CacheManager
from scheduler_proc.grammar import GrammarQueue
from scheduler_proc.in_flight import InFlight
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.model_runner import ModelRunner
from scheduler_proc.request import Request
from scheduler_proc.scheduler_io import SchedulerIO
from scheduler_proc.tp.workers import TPWorkers
from scheduler_proc.trainer_ops import TrainerOps

logger = logging.getLogger(__name__)


class ControlCalls:
    """Part of Scheduler (scheduler.py), whose state is listed below; it also calls the scheduler's
    process() (the step in flight, read before a trainer's call) and retract()."""

    args: EngineArgs
    io: SchedulerIO
    runner: ModelRunner
    pool: KVPool
    cache: CacheManager
    waiting: deque[Request]
    running: list[Request]
    grammars: GrammarQueue
    trainer: TrainerOps
    tp_workers: Optional[TPWorkers]
    in_flight: Optional[InFlight]
    num_retractions: int
    overlap: bool

    def answer_control(self, msg: ControlRequest) -> None:
        if msg.args is not None:
            self.io.reply(msg, self.run_trainer_op(msg.args))
        else:
            self.io.answer(msg, {"server_info": self.server_info, "flush_cache": self.flush_cache})

    def server_info(self) -> dict[str, Any]:
        return (
            self.runner.info()
            | {
                "kv_free_tokens": self.pool.num_free_slots(),
                "kv_cached_tokens": self.cache.cached_tokens(),  # held by the prefix cache, evictable
                "num_running": len(self.running),
                "num_waiting": len(self.waiting) + len(self.grammars),  # some may wait for their grammar
                "num_retractions": self.num_retractions,
                "overlap_schedule": self.overlap,
                "tp_worker_pids": self.tp_workers.pids if self.tp_workers is not None else [],
            }
            | self.trainer.info()
            | self.grammars.info()
            | ({"step_profile": self.runner.profiler.summary()} if self.args.profile_steps else {})
        )

    def flush_cache(self) -> dict[str, Any]:
        """Empty the prefix cache, only when no request is running or waiting."""
        if self.running or self.waiting or self.grammars:
            waiting = len(self.waiting) + len(self.grammars)  # some waiting for their grammar
            message = f"not flushed: {len(self.running)} running and {waiting} waiting requests"
            return {"ok": False, "message": message}
        freed = self.cache.flush()
        logger.info("prefix cache flushed: %d tokens freed", freed)
        return {"ok": True, "message": f"flushed the prefix cache ({freed} tokens freed)"}

    def run_trainer_op(self, op: TrainerOp) -> dict[str, Any]:
        """A trainer's call, between steps. Requests running when memory is released, or when the
        weights change and the prefix cache is flushed, go back to the waiting queue keeping their
        tokens, and resume once they can (computing their KV afresh): no KV is read while it is away,
        and none computed by the old weights is reused."""
        if self.in_flight is not None:  # the step in flight ran on the old weights: read it first
            self.process(self.in_flight)
            self.in_flight = None
        if isinstance(op, ReleaseMemory):
            self._retract_all("memory released", flush="kv_cache" in op.tags)
        result = self.trainer.run(op)
        if result.success and getattr(op, "flush_cache", False):
            self._retract_all("weights updated", flush=True)
        return msgspec.to_builtins(result)

    def _retract_all(self, why: str, flush: bool) -> None:
        for req in list(self.running):
            self.retract(req, why)
        if flush:
            freed = self.cache.flush()
            logger.info("prefix cache flushed (%s): %d tokens freed", why, freed)
