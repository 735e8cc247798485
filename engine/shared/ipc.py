"""ZMQ endpoints of one engine, in its private directory, and the two socket kinds every process uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class Endpoints:
    """IPC addresses of one engine; each is bound by the process named and connected to by the others."""

    dir: str  # the engine's private directory: args.json, the sockets, tensor parallelism's rendezvous file
    scheduler: str  # scheduler's PULL: requests, aborts, control calls
    detokenizer: str  # detokenizer's PULL: token batches
    frontend: str  # frontend's PULL: text batches, readiness, errors, control replies

    @classmethod
    def in_dir(cls, directory: str) -> Endpoints:
        return cls(
            dir=directory,
            scheduler=f"ipc://{os.path.join(directory, 'scheduler')}",
            detokenizer=f"ipc://{os.path.join(directory, 'detokenizer')}",
            frontend=f"ipc://{os.path.join(directory, 'frontend')}",
        )


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
