"""How rank 0 hands a trainer's call (weight update, weight read, memory release) to the other
tensor-parallel ranks, between steps: the TRAINER_OP command with the op's encoded length, then its
bytes, over the host group; every rank runs the op and rank 0 gathers each rank's OpResult."""

from __future__ import annotations

from typing import Optional

import msgspec
import torch

from engine.shared.weight_protocol import OpResult, TrainerOp
from scheduler_proc.tp.group import TPGroup
from scheduler_proc.tp.step_broadcast import TRAINER_OP

_op_decoder = msgspec.msgpack.Decoder(TrainerOp)
_result_decoder = msgspec.msgpack.Decoder(OpResult)


def send_op(tp: TPGroup, op: TrainerOp) -> None:
    """Rank 0: hand `op` to the other ranks (they are in their loop, waiting for a command)."""
    data = msgspec.msgpack.encode(op)
    tp.broadcast_ints(torch.tensor([TRAINER_OP, len(data)], dtype=torch.int64))
    _broadcast_bytes(tp, data, len(data))


def receive_op(tp: TPGroup, packed: torch.Tensor) -> TrainerOp:
    """Ranks 1..: the op of a TRAINER_OP command (`packed`: the command as broadcast)."""
    return _op_decoder.decode(_broadcast_bytes(tp, None, int(packed[1])))


def gather_results(tp: TPGroup, result: OpResult) -> Optional[list[OpResult]]:
    """Every rank's result, on rank 0 (the others get None)."""
    import torch.distributed as dist

    data = msgspec.msgpack.encode(result)
    lengths = tp.gather_ints([len(data)])
    longest = torch.tensor([len(data)], dtype=torch.int64)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=tp.host_group)
    padded = torch.zeros(int(longest), dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(tp.size)] if tp.is_first else None
    dist.gather(padded, parts, dst=0, group=tp.host_group)
    if parts is None or lengths is None:
        return None
    return [_result_decoder.decode(part[: n[0]].numpy().tobytes()) for part, n in zip(parts, lengths)]


def _broadcast_bytes(tp: TPGroup, data: Optional[bytes], size: int) -> bytes:
    import torch.distributed as dist

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(size, dtype=torch.uint8)
    dist.broadcast(buffer, src=0, group=tp.host_group)
    return buffer.numpy().tobytes()
