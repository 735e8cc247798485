"""Rank 0's commands to the other tensor-parallel ranks (each step, a request for memory figures, a
trainer's call) over ZMQ: rank 0 sends and goes on, the other ranks wait for the next command.

Not a gloo broadcast, which the commands used to be: gloo's TCP transport sends only once the
receiver has posted its receive and said so, through a background thread on each side, so rank 0
paid a round trip and thread wake-ups every step (hundreds of µs on a loaded host, more when a rank
was late). A ZMQ send hands the message to ZMQ's I/O thread and returns in a few µs. Whatever
follows a command on the process group (a gather, the step's device part on NCCL) runs in the same
order on every rank, as before.

Rank 0 binds a ROUTER: a unix socket beside the group's rendezvous file when all ranks are on this
machine, else a TCP port on node 0 that the system picks and the host group tells the others. Each
other rank connects a DEALER and says hello with its rank, so that rank 0 can address every rank before
the first command (a ROUTER drops what it cannot address).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import zmq

_ADDRESS_INTS = 128  # an endpoint's characters, as int64s, in one host-group broadcast


class CommandChannel:
    """One ROUTER (rank 0) or DEALER (other ranks) socket carrying int64 tensors from rank 0."""

    def __init__(self, rank: int, size: int, init_method: str, host_group: Any) -> None:
        self.rank = rank
        self.context = zmq.Context(1)
        kind = zmq.ROUTER if rank == 0 else zmq.DEALER
        self.socket = self.context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM if rank == 0 else zmq.RCVHWM, 0)  # never drop a command
        address = self._bind(init_method) if rank == 0 else None
        address = _broadcast_address(address, host_group)
        self.peers: list[bytes] = []
        if rank == 0:
            hellos = [self.socket.recv_multipart() for _ in range(size - 1)]
            self.peers = [identity for identity, _ in sorted(hellos, key=lambda h: int(h[1]))]
        else:
            self.socket.connect(address)
            self.socket.send(str(rank).encode())

    def _bind(self, init_method: str) -> str:
        if init_method.startswith("file://"):
            address = f"ipc://{init_method.removeprefix('file://')}.commands"
            self.socket.bind(address)
            return address
        host = init_method.removeprefix("tcp://").rpartition(":")[0]
        port = self.socket.bind_to_random_port("tcp://*")
        return f"tcp://{host}:{port}"

    def send(self, payload: torch.Tensor) -> None:
        """Rank 0: a 1-D int64 host tensor to every other rank."""
        data = payload.numpy().tobytes()
        for peer in self.peers:
            self.socket.send_multipart([peer, data], copy=len(data) < 65536)

    def receive(self) -> torch.Tensor:
        """Ranks 1..: the next command's tensor (waits for it)."""
        data = self.socket.recv()
        if not data:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(data), dtype=torch.int64)


def _broadcast_address(address: Optional[str], host_group: Any) -> str:
    """Rank 0's endpoint, told to every rank over the host group (once, when the group is made)."""
    import torch.distributed as dist

    codes = torch.zeros(_ADDRESS_INTS, dtype=torch.int64)
    if address is not None:
        assert len(address) < _ADDRESS_INTS, address
        codes[: len(address)] = torch.tensor(list(address.encode()), dtype=torch.int64)
    dist.broadcast(codes, src=0, group=host_group)
    return bytes(c for c in codes.tolist() if c).decode()
