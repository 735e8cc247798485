"""ZMQ endpoints of one engine, in its private directory, and the two socket kinds every process uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class Endpoints:
    """IPC addresses of one engine, as scheduler replica dp_rank sees them; each is bound by the process
    named and connected to by the others. The detokenizer and the frontend are shared by every replica."""

    dir: str  # the engine's private directory: args.json, the sockets, tensor parallelism's rendezvous files
    scheduler: str  # this replica's scheduler PULL: requests, aborts, control calls
    detokenizer: str  # detokenizer's PULL: token batches (from every replica)
    frontend: str  # frontend's PULL: text batches, readiness, errors, control replies
    dp_rank: int = 0  # the scheduler replica (data parallelism) these are for

    @classmethod
    def in_dir(cls, directory: str, dp_rank: int = 0) -> Endpoints:
        scheduler = "scheduler" if dp_rank == 0 else f"scheduler-{dp_rank}"
        return cls(
            dir=directory,
            scheduler=f"ipc://{os.path.join(directory, scheduler)}",
            detokenizer=f"ipc://{os.path.join(directory, 'detokenizer')}",
            frontend=f"ipc://{os.path.join(directory, 'frontend')}",
            dp_rank=dp_rank,
        )

    @property
    def tp_init_file(self) -> str:
        """The rendezvous file of this replica's tensor-parallel group (ranks on this machine only)."""
        return os.path.join(self.dir, "tp_init" if self.dp_rank == 0 else f"tp_init-{self.dp_rank}")


def replica_name(role: str, dp_rank: int, dp_size: int) -> str:
    """How logs and errors name a process of replica dp_rank: "scheduler", or "scheduler replica 1"."""
    return role if dp_size == 1 else f"{role} replica {dp_rank}"


def pull_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # never drop: every message is a user's request or tokens
    sock.bind(endpoint)
    return sock


def push_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock
