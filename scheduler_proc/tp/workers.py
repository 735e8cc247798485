"""Rank 0's side of tensor parallelism's processes: start one worker process per other rank on this
machine, join the group with them (and with the ranks of the other machines, nnodes > 1), and end the
scheduler (and so the engine) when any of them dies.

A rank that dies leaves the others waiting in a collective that never completes, so nothing is
retried: rank 0 reports the death to the frontend, which fails every waiting call, and exits. The
workers die with rank 0 (worker_main.py), so no rank is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import zmq

from engine.shared.args import EngineArgs
from engine.shared.child_process import MULTICAST_OFF_ENV, report_error
from engine.shared.ipc import Endpoints
from scheduler_proc.tp.group import TPGroup, group_init_method, join_group, rank_device

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.1


class TPWorkers:
    """The worker processes of the other ranks on this machine, watched by a thread of rank 0."""

    def __init__(self, args: EngineArgs, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        env = dict(os.environ) | MULTICAST_OFF_ENV
        self.ranks = [rank for rank in args.node_ranks() if rank != 0]
        command = [sys.executable, "-m", "scheduler_proc.tp.worker_main", endpoints.dir, str(os.getpid())]
        self.procs = [
            subprocess.Popen(
                [*command, str(rank), str(endpoints.dp_rank)],
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # as the other children: a terminal's Ctrl-C is the caller's
            )
            for rank in self.ranks
        ]
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _watch(self) -> None:
        while True:
            for rank, proc in zip(self.ranks, self.procs):
                code = proc.poll()
                if code is not None:
                    self._fail(rank, proc.pid, code)
            time.sleep(_POLL_SECONDS)

    def _fail(self, rank: int, pid: int, code: int) -> None:
        """A worker is gone: stop the others, tell the frontend, exit (from this thread: the main
        thread may be blocked in a collective for good)."""
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        message = f"tensor-parallel rank {rank} (pid {pid}) {how}; the engine cannot run without it"
        logger.error(message)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        report_error(zmq.Context(), self.endpoints, "scheduler", message, "")
        os._exit(1)

    def wait_for_exit(self, timeout: float) -> None:
        """Give the watcher `timeout` seconds to notice a dead worker (and report it and exit): rank 0
        failing is most often a worker's death (a collective with it failed), the error to report."""
        time.sleep(timeout + 2 * _POLL_SECONDS)


def start_tensor_parallel(args: EngineArgs, endpoints: Endpoints) -> tuple[TPGroup, Optional[TPWorkers]]:
    """Rank 0's group and the workers of this machine's other ranks; a trivial group and no workers
    when tp_size is 1."""
    if args.tp_size == 1:
        return TPGroup(), None
    workers = TPWorkers(args, endpoints)
    return join_group(0, args.tp_size, group_init_method(args, endpoints), rank_device(args, 0)), workers
