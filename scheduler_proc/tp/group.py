"""Tensor parallelism's process group on torch.distributed: joining it, and the collectives that the
sharded layers (all-reduce, logits gather) and the step hand-off use.

Two groups: the model's collectives run on NCCL over the GPUs (gloo when device="cpu"), and a gloo
group carries small host-side messages (the KV budget, memory figures, trainer ops), where a host
tensor needs no copy to and from a GPU. Rank 0's commands (each step's host part) go over ZMQ
(command_channel.py), which rank 0 does not wait on.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch

from engine.shared.args import EngineArgs
from engine.shared.child_process import MULTICAST_OFF_ENV
from engine.shared.ipc import Endpoints
from scheduler_proc.tp.command_channel import CommandChannel

# A dead rank is found by the process watchers (workers.py, node_host.py) within a second, so this
# timeout of the host group's collectives only has to never fire.
_HOST_GROUP_TIMEOUT = timedelta(days=3650)


class TPGroup:
    """This process's rank in the tensor-parallel group. With size 1 every collective is a no-op and
    torch.distributed is never touched, so the single-device path pays nothing."""

    def __init__(
        self,
        rank: int = 0,
        size: int = 1,
        host_group: Optional[object] = None,
        commands: Optional[CommandChannel] = None,
    ) -> None:
        self.rank, self.size = rank, size
        self.host_group = host_group
        self.commands = commands

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that schedules, samples and talks to the other processes."""
        return self.rank == 0

    # ---- the model's collectives ----

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (a row-parallel layer's partial products)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Rank 0 gets every rank's x joined along the last dim (vocab shards of the logits); the
        other ranks take part and get None."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_tensor(self, x: torch.Tensor) -> None:
        """Rank 0's x to every rank, in place, on the model's group: on NCCL it is queued on the device's
        stream like a kernel, so neither side's host waits for it."""
        import torch.distributed as dist

        dist.broadcast(x, src=0)

    # ---- host-side messages (gloo) ----

    def min_over_ranks(self, value: int) -> int:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(t.item())

    def gather_ints(self, values: list[int]) -> Optional[list[list[int]]]:
        """Rank 0 gets every rank's list (same length on every rank); the others get None."""
        if self.size == 1:
            return [values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.is_first else None
        dist.gather(t, parts, dst=0, group=self.host_group)
        return [p.tolist() for p in parts] if parts is not None else None

    def broadcast_ints(self, payload: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rank 0 passes a 1-D int64 host tensor (a command); every rank returns it. Rank 0 does not wait
        for the others to take it (command_channel.py)."""
        assert self.commands is not None
        if self.is_first:
            assert payload is not None and payload.dtype == torch.int64
            self.commands.send(payload)
            return payload
        return self.commands.receive()


def join_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """Join the group of `size` processes that meet at init_method (see group_init_method)."""
    import torch.distributed as dist

    os.environ.update(MULTICAST_OFF_ENV)  # read by NCCL when the communicator is made: before joining
    if _on_this_host(init_method):  # every rank is on this host: gloo over loopback, whatever the host name
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # NCCL binds this process to its GPU
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=size,
        device_id=device if cuda else None,  # NCCL's communicator is made now, before any graph capture
    )
    host_group = dist.new_group(backend="gloo", timeout=_HOST_GROUP_TIMEOUT)
    return TPGroup(rank, size, host_group, CommandChannel(rank, size, init_method, host_group))


def group_init_method(args: EngineArgs, endpoints: Endpoints) -> str:
    """Where a replica's ranks meet: a file in the engine's private IPC directory when they are all on
    this machine (two engines on one host never meet), else node 0's dist_init_addr (rank 0 holds the
    torch.distributed store there, so it lives exactly as long as rank 0)."""
    if args.nnodes > 1:
        return f"tcp://{args.dist_init_addr}"
    return f"file://{endpoints.tp_init_file}"


def _on_this_host(init_method: str) -> bool:
    host = init_method.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    return init_method.startswith("file://") or host == "localhost" or host == "::1" or host.startswith("127.")


def rank_device(args: EngineArgs, rank: int) -> torch.device:
    """The device of `rank`: cuda:(base_gpu_id + the rank's place on its machine), or the CPU."""
    local = rank - args.node_rank * args.ranks_per_node
    return torch.device("cuda", args.base_gpu_id + local) if args.device == "cuda" else torch.device(args.device)


class CollectiveFailed(BaseException):
    """A collective failed on rank 0 under tensor parallelism (most often: another rank died), so the
    ranks may be out of step and nothing after can be trusted. A BaseException, so that the scheduler's
    per-step recovery (which catches Exception) lets it end the process, whose report reaches the caller."""
