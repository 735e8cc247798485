"""A tensor-parallel worker process, ranks 1..tp_size-1: `python -m scheduler_proc.tp.worker_main
<ipc_dir> <parent pid> <rank> [dp_rank]`, started by the scheduler (rank 0) of replica dp_rank, or on
another machine (nnodes > 1) by the Engine that hosts that machine's ranks (engine/node_host.py). It
loads its shard of the model, captures its CUDA graphs in step with rank 0, then runs every step rank 0
hands it.

A failure here reaches the caller as this rank's error (ProcessError to its parent's frontend socket),
and the worker never outlives its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING

import zmq

from engine.shared.args import EngineArgs
from engine.shared.child_process import freeze_startup_heap, run_child
from engine.shared.ipc import Endpoints

if TYPE_CHECKING:
    from scheduler_proc.model_runner import ModelRunner

_PR_SET_PDEATHSIG = 1


def main() -> None:
    ipc_dir, parent_pid, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dp_rank = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    _die_with_parent(parent_pid)

    def run(args: EngineArgs, endpoints: Endpoints, context: zmq.Context) -> None:
        # Imported in here, as in follow_rank0: an import failure is reported to the caller like any other.
        from scheduler_proc.model_runner import ModelRunner
        from scheduler_proc.tp.group import group_init_method, join_group, rank_device

        tp = join_group(rank, args.tp_size, group_init_method(args, endpoints), rank_device(args, rank))
        follow_rank0(ModelRunner(args, tp))

    # The IPC directory is the frontend's: rank 0's exit does not mean the frontend is gone.
    run_child(f"tensor-parallel rank {rank}", ipc_dir, parent_pid, run, owns_ipc_dir=False, dp_rank=dp_rank)


def follow_rank0(runner: ModelRunner) -> None:
    """The loop of ranks 1..: run whatever rank 0 broadcasts, until the process is ended."""
    from scheduler_proc.tp.step_broadcast import MEMORY, STEP, TRAINER_OP
    from scheduler_proc.trainer_ops import TrainerOps

    tp = runner.tp
    trainer = TrainerOps(runner)  # this rank's weight updates and memory release
    freeze_startup_heap()
    while True:
        packed = tp.broadcast_ints()
        command = int(packed[0])
        if command == STEP:
            batch, (rows, positions, slots) = runner.steps.receive(packed)
            if rows.numel():
                runner.pool.set_tokens(rows, positions, slots)
            runner.run_forward(batch)
        elif command == MEMORY:
            tp.gather_ints(runner.memory_figures())
        elif command == TRAINER_OP:
            trainer.follow(packed)
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process the moment rank 0 exits, however it exits (the parent
    watch thread would take up to its poll period, and shutdown() waits for every rank to be gone);
    then make sure rank 0 did not exit before the request took hold."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(1)


if __name__ == "__main__":
    main()
