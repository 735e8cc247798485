"""Tensor parallelism's process group on torch.distributed: joining it, and the collectives that the
sharded layers (all-reduce, logits gather) and the step hand-off (int64 broadcast) use.

Two groups: the model's collectives run on NCCL over the GPUs (gloo when device="cpu"), and a gloo
group carries small host-side messages (each step's batch, the KV budget, memory figures), where a
host tensor needs no copy to and from a GPU.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch

from engine.shared.args import EngineArgs
from engine.shared.child_process import MULTICAST_OFF_ENV

# The workers wait in a host broadcast for as long as the engine is idle. A dead rank is found by the
# process watchers (workers.py) within a second, so this timeout only has to never fire.
_HOST_GROUP_TIMEOUT = timedelta(days=3650)
# One broadcast carries a step of up to this many int64s (a decode step of ~800 requests); a larger
# one follows with a second broadcast. Latency, not size, is a small broadcast's cost.
_PACKET_INTS = 4096


class TPGroup:
    """This process's rank in the tensor-parallel group. With size 1 every collective is a no-op and
    torch.distributed is never touched, so the single-device path pays nothing."""

    def __init__(self, rank: int = 0, size: int = 1, host_group: Optional[object] = None) -> None:
        self.rank, self.size = rank, size
        self.host_group = host_group

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
        """Rank 0 passes a 1-D int64 host tensor; every rank returns it. One broadcast of a fixed-size
        packet (length first) when it fits, a second one for the rest when it does not."""
        import torch.distributed as dist

        packet = torch.zeros(_PACKET_INTS, dtype=torch.int64)
        room = _PACKET_INTS - 1
        if self.is_first:
            assert payload is not None and payload.dtype == torch.int64
            packet[0] = payload.numel()
            packet[1 : 1 + min(room, payload.numel())] = payload[:room]
        dist.broadcast(packet, src=0, group=self.host_group)
        n = int(packet[0])
        if n <= room:
            return packet[1 : 1 + n]
        rest = payload[room:].contiguous() if self.is_first else torch.empty(n - room, dtype=torch.int64)
        dist.broadcast(rest, src=0, group=self.host_group)
        return torch.cat([packet[1:], rest])


def join_group(rank: int, size: int, init_file: str, device: torch.device) -> TPGroup:
    """Join the group of `size` processes that rendezvous through init_file (in the engine's private
    IPC directory, so two engines on one host never meet)."""
    import torch.distributed as dist

    os.environ.update(MULTICAST_OFF_ENV)  # read by NCCL when the communicator is made: before joining
    # Every rank is on this host: gloo over loopback, whatever the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # NCCL binds this process to its GPU
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=size,
        device_id=device if cuda else None,  # NCCL's communicator is made now, before any graph capture
    )
    host_group = dist.new_group(backend="gloo", timeout=_HOST_GROUP_TIMEOUT)
    return TPGroup(rank, size, host_group)


def rank_device(args: EngineArgs, rank: int) -> torch.device:
    """The device of `rank`: cuda:(base_gpu_id + rank), or the CPU."""
    return torch.device("cuda", args.base_gpu_id + rank) if args.device == "cuda" else torch.device(args.device)


class CollectiveFailed(BaseException):
    """A collective failed on rank 0 under tensor parallelism (most often: another rank died), so the
    ranks may be out of step and nothing after can be trusted. A BaseException, so that the scheduler's
    per-step recovery (which catches Exception) lets it end the process, whose report reaches the caller."""
