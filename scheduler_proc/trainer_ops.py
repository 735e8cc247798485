"""A trainer's calls on the scheduler's side: weight updates (from tensors, disk or the trainer's process
group), weight reads and memory release, run between steps on every tensor-parallel rank alike.

Rank 0 hands each op to the other ranks (tp/op_broadcast.py), runs it on its own shard and combines
every rank's OpResult; the scheduler around it settles the step in flight and the requests first.
An op that does not fit (an unknown weight name, a wrong shape) changes nothing and answers
success=False with a message naming what is wrong; the engine keeps serving.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from engine.shared.tensor_wire import dtype_from_name, from_wire
from engine.shared.weight_protocol import (
    CaptureGraphs,
    DestroyWeightsUpdateGroup,
    GetWeightsByName,
    InitWeightsUpdateGroup,
    OpResult,
    ReleaseMemory,
    ResumeMemory,
    TrainerOp,
    UpdateFromDisk,
    UpdateFromDistributed,
    UpdateFromTensor,
    op_name,
)
from scheduler_proc.memory_release import MemoryOccupation
from scheduler_proc.model_runner import ModelRunner
from scheduler_proc.tp.group import CollectiveFailed
from scheduler_proc.tp.op_broadcast import gather_results, receive_op, send_op
from scheduler_proc.weight_group import WeightGroups
from scheduler_proc.weight_read import read_weight
from scheduler_proc.weight_update import (
    UpdateRefused,
    WeightSpec,
    check_update,
    load_checked,
    update_from_disk,
    update_from_tensors,
)

logger = logging.getLogger(__name__)

_WEIGHTS_AWAY = "the weights are released (release_memory_occupation); call resume_memory_occupation() first"


class TrainerOps:
    """The trainer ops of one rank, and (on rank 0) their hand-off to the other ranks."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.memory = MemoryOccupation(runner)
        self.groups = WeightGroups(runner.device, runner.tp.rank)

    @property
    def holds_requests(self) -> bool:
        """Memory is released: no step can run until it is resumed."""
        return self.memory.holds_requests

    def run(self, op: TrainerOp) -> OpResult:
        """Rank 0: run `op` on every rank; success when every rank succeeded. A resume that failed on
        some rank leaves rank 0 holding requests too (a retry completes it); one that succeeded
        everywhere captures the CUDA graphs everywhere."""
        released = set(self.memory.released)
        result = self._on_every_rank(op)
        if isinstance(op, ResumeMemory) and not result.success:
            self.memory.released |= released & set(op.tags)
        elif isinstance(op, ResumeMemory) and self.memory.graphs_wanted:
            captured = self._on_every_rank(CaptureGraphs())
            return OpResult(captured.success, f"{result.message}; {captured.message}")
        return result

    def _on_every_rank(self, op: TrainerOp) -> OpResult:
        tp = self.runner.tp
        if tp.size == 1:
            return self.apply(op)
        try:
            send_op(tp, op)
            result = self.apply(op)
            results = gather_results(tp, result)
        except Exception as exc:
            raise CollectiveFailed(f"{op_name(op)} failed across the tensor-parallel ranks: {exc}") from exc
        assert results is not None
        failed = [(rank, r) for rank, r in enumerate(results) if not r.success]
        if not failed:
            return result
        rank, first = failed[0]
        return OpResult(False, first.message if rank == 0 else f"tensor-parallel rank {rank}: {first.message}")

    def follow(self, packed: torch.Tensor) -> None:
        """Ranks 1..: run the op of a TRAINER_OP command and send rank 0 the result."""
        tp = self.runner.tp
        gather_results(tp, self.apply(receive_op(tp, packed)))

    def apply(self, op: TrainerOp) -> OpResult:
        """Run `op` on this rank's shard; a refusal or failure is an unsuccessful result, not an error."""
        start = time.perf_counter()
        try:
            result = self._dispatch(op)
        except UpdateRefused as exc:
            return OpResult(False, str(exc))
        except Exception as exc:  # reported to the caller, who decides; the engine keeps serving
            logger.exception("%s failed", op_name(op))
            return OpResult(False, f"{op_name(op)} failed: {type(exc).__name__}: {exc}")
        logger.info("%s: %s (%.3fs)", op_name(op), result.message, time.perf_counter() - start)
        return result

    def _dispatch(self, op: TrainerOp) -> OpResult:
        if isinstance(op, ReleaseMemory):
            return OpResult(True, self.memory.release(op.tags))
        if isinstance(op, ResumeMemory):
            return OpResult(True, self.memory.resume(op.tags))
        if isinstance(op, CaptureGraphs):
            return OpResult(True, self.memory.capture_graphs())
        if isinstance(op, InitWeightsUpdateGroup):
            return OpResult(True, self.groups.join(op))
        if isinstance(op, DestroyWeightsUpdateGroup):
            if op.group_name not in self.groups:
                raise UpdateRefused(f"no weight update group named {op.group_name!r} to destroy")
            return OpResult(True, self.groups.leave(op.group_name))
        if isinstance(op, UpdateFromDistributed):
            return self._update_from_distributed(op)
        if isinstance(op, UpdateFromTensor):
            return self._update_from_tensor(op)
        if "weights" in self.memory.released:
            raise UpdateRefused(_WEIGHTS_AWAY)
        model = self.runner.model
        if isinstance(op, UpdateFromDisk):
            count = update_from_disk(model, self.runner.config, op.model_path)
            return self._updated(f"updated {count} parameters from {op.model_path}")
        assert isinstance(op, GetWeightsByName), op
        values = read_weight(model, self.runner.tp, op.name, op.truncate_size)
        return OpResult(True, f"read {op.name}", values)

    def _update_from_tensor(self, op: UpdateFromTensor) -> OpResult:
        # Opened on every rank before anything is checked: the caller's allocator keeps each GPU
        # tensor until every rank that was handed it has opened and dropped it.
        named = [(t.name, from_wire(t, self.runner.tp.rank)) for t in op.tensors]
        if "weights" in self.memory.released:
            raise UpdateRefused(_WEIGHTS_AWAY)
        count = update_from_tensors(self.runner.model, named)
        sources = {t.device for _, t in named if t.is_cuda}  # the caller's GPUs, which the copies read
        return self._updated(f"updated {count} parameters from {len(named)} tensors", sources)

    def _update_from_distributed(self, op: UpdateFromDistributed) -> OpResult:
        if op.group_name not in self.groups:
            raise UpdateRefused(f"no weight update group named {op.group_name!r}; call init_weights_update_group first")
        specs = [WeightSpec(n, list(s), dtype_from_name(d)) for n, d, s in zip(op.names, op.dtypes, op.shapes)]
        try:
            if "weights" in self.memory.released:
                raise UpdateRefused(_WEIGHTS_AWAY)
            check_update(self.runner.model, specs)
        except UpdateRefused:
            self.groups.drain(op)  # the trainer broadcasts all the same: take part, keep nothing
            raise
        count = load_checked(self.runner.model, self.groups.receive(op))
        return self._updated(f"updated {count} parameters from {len(specs)} tensors of group {op.group_name!r}")

    def _updated(self, message: str, sources: frozenset[torch.device] = frozenset()) -> OpResult:
        # The copies are done before the reply: once the caller has it, it may free or change its tensors.
        for device in {self.runner.device, *sources}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return OpResult(True, message)

    def info(self) -> dict[str, Any]:
        return {"memory_released": sorted(self.memory.released)}
