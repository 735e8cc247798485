"""How rank 0 drives the other tensor-parallel ranks: each step's ForwardBatch, with the req_to_token
writes made since the last step, packed into one int64 tensor and broadcast over the host group; the
other ranks unpack it, replay the writes and run the same forward. A second command asks them for
their memory figures (server info), a third hands them a trainer's call (op_broadcast.py).

Packed layout: [command, T, B, R, N, is_decode, prefix_lens (B), extend_lens (B)] on the host, then
input_ids, positions, out_cache_loc (T each), req_pool_indices (B), logit_rows (R), and the writes'
rows, positions and slots (N each), copied from the device in one transfer.
"""

from __future__ import annotations

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.tp.group import TPGroup

STEP, MEMORY, TRAINER_OP = 0, 1, 2  # commands (TRAINER_OP: tp/op_broadcast.py)
_HEADER = 6

Writes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # req_to_token rows, positions, slots


def pack_step(batch: ForwardBatch, writes: Writes) -> torch.Tensor:
    """The step as one int64 host tensor (rank 0)."""
    on_device = [
        batch.input_ids,
        batch.positions,
        batch.out_cache_loc,
        batch.req_pool_indices,
        batch.logit_rows,
        *writes,
    ]
    assert all(t.dtype == torch.int64 for t in on_device), [t.dtype for t in on_device]
    sizes = [len(batch.input_ids), batch.batch_size, len(batch.logit_rows), len(writes[0])]
    host = torch.tensor(
        [STEP, *sizes, int(batch.is_decode), *batch.prefix_lens_cpu, *batch.extend_lens_cpu], dtype=torch.int64
    )
    return torch.cat([host, torch.cat(on_device).cpu()])


def unpack_step(packed: torch.Tensor, device: torch.device) -> tuple[ForwardBatch, Writes]:
    """The ForwardBatch and the req_to_token writes of a packed step (ranks 1..)."""
    _, num_tokens, batch_size, num_rows, num_writes, is_decode = packed[:_HEADER].tolist()
    lens = packed[_HEADER : _HEADER + 2 * batch_size].tolist()
    on_device = packed[_HEADER + 2 * batch_size :].to(device)
    T, N = num_tokens, num_writes
    input_ids, positions, out_cache_loc, req_pool_indices, logit_rows, rows, cols, slots = on_device.split(
        [T, T, T, batch_size, num_rows, N, N, N]
    )
    batch = ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_cache_loc=out_cache_loc,
        req_pool_indices=req_pool_indices,
        prefix_lens_cpu=lens[:batch_size],
        extend_lens_cpu=lens[batch_size:],
        logit_rows=logit_rows,
        is_decode=bool(is_decode),
    )
    return batch, (rows, cols, slots)


def ask_memory(tp: TPGroup, own: list[int]) -> list[list[int]]:
    """Every rank's memory figures (rank 0, whose own are `own`); the others answer in their loop."""
    if tp.size > 1:
        tp.broadcast_ints(torch.tensor([MEMORY], dtype=torch.int64))
    figures = tp.gather_ints(own)
    assert figures is not None
    return figures
