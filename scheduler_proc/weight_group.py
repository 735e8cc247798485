"""A trainer's process group for weight updates, joined by every rank of the engine: the trainer is rank
0 and broadcasts each tensor; this engine's tensor-parallel rank r is rank `rank_offset + r`.

It is joined exactly as SGLang's (and verl's, OpenRLHF's, AReaL's) `init_custom_process_group` makes it,
so a trainer using that helper connects unchanged: a rendezvous at tcp://{master_address}:{master_port},
its store wrapped in a PrefixStore keyed by the group's name, and a non-default process group named
`group_name`, with the global ranks mapped one to one onto the group's. The engine's own
tensor-parallel group is untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

import torch

from engine.shared.weight_protocol import InitWeightsUpdateGroup, UpdateFromDistributed

logger = logging.getLogger(__name__)


class WeightGroups:
    """The update groups this rank has joined, by name."""

    def __init__(self, device: torch.device, tp_rank: int) -> None:
        self.device = device
        self.tp_rank = tp_rank
        self.groups: dict[str, tuple[object, str]] = {}  # name -> (process group, backend)

    def __contains__(self, group_name: str) -> bool:
        return group_name in self.groups

    def join(self, op: InitWeightsUpdateGroup) -> str:
        """Join the trainer's group (blocks until all of its world_size ranks have); returns a message."""
        if op.group_name in self.groups:
            raise ValueError(f"this engine has joined weight update group {op.group_name!r} already")
        rank = op.rank_offset + self.tp_rank
        init_method = f"tcp://{op.master_address}:{op.master_port}"
        group = init_custom_process_group(op.backend, init_method, op.world_size, rank, op.group_name)
        self.groups[op.group_name] = (group, op.backend)
        logger.info(
            "joined weight update group %s at %s as rank %d of %d", op.group_name, init_method, rank, op.world_size
        )
        return f"joined weight update group {op.group_name!r} as rank {rank} of {op.world_size}"

    def leave(self, group_name: str) -> str:
        """Destroy this rank's side of a group it joined; returns a message."""
        import torch.distributed as dist

        group, _ = self.groups.pop(group_name)
        dist.destroy_process_group(group)
        logger.info("left weight update group %s", group_name)
        return f"left weight update group {group_name!r}"

    def receive(self, op: UpdateFromDistributed) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor the trainer broadcasts, in the call's order, received as it is asked for (so
        that one tensor at a time is held, besides the weights)."""
        import torch.distributed as dist

        from engine.shared.tensor_wire import dtype_from_name

        group, backend = self.groups[op.group_name]
        device = self.device if backend == "nccl" else torch.device("cpu")  # gloo broadcasts host tensors
        for name, dtype, shape in zip(op.names, op.dtypes, op.shapes):
            tensor = torch.empty(shape, dtype=dtype_from_name(dtype), device=device)
            dist.broadcast(tensor, src=0, group=group)
            yield name, tensor

    def drain(self, op: UpdateFromDistributed) -> None:
        """Receive and drop every tensor of a refused update: the trainer's broadcasts must complete."""
        for _ in self.receive(op):
            pass


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str) -> object:
    """A process group of its own, as SGLang's helper of this name makes it (see the module docstring)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        default_pg_timeout,
        rendezvous,
    )

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=default_pg_timeout))
    store.set_timeout(default_pg_timeout)
    store = PrefixStore(group_name, store)
    # torch 2.6 renamed the helper's pg_options to backend_options.
    options = (
        "backend_options"
        if "backend_options" in inspect.signature(_new_process_group_helper).parameters
        else "pg_options"
    )
    with _unbound_default_group():
        group, _ = _new_process_group_helper(
            world_size,
            rank,
            [],
            Backend(backend),
            store,
            group_name=group_name,
            timeout=default_pg_timeout,
            **{options: None},
        )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@contextlib.contextmanager
def _unbound_default_group() -> Iterator[None]:
    """Under tensor parallelism on GPUs the default group is ours, made eagerly and so bound to its
    GPU; torch would then make a new NCCL group by splitting that communicator, which the trainer is
    not part of. Unbound while the trainer's group is made, it is made from the store, as the trainer
    makes its side."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_group

    default = _get_default_group() if dist.is_initialized() else None
    bound = default.bound_device_id if default is not None else None
    if bound is not None:
        default.bound_device_id = None
    try:
        yield
    finally:
        if bound is not None:
            default.bound_device_id = bound
