"""How rank 0 drives the other tensor-parallel ranks: each step's ForwardBatch, with the req_to_token
writes made since the last step, handed over so that every rank runs the same forward. A second
command asks them for their memory figures (server info), a third hands them a trainer's call
(op_broadcast.py).

A step has two parts. Its host part (the command, sizes, prefix and extend lengths) is what the other
ranks need on the host to plan attention; it goes over the host group (gloo) in one fixed-size packet.
Its device part (input ids, positions, KV slots, rows, logit rows and the req_to_token writes) is on
rank 0's device, and under overlap partly not computed yet (a decode's input id is the sampled id of
the step in flight). On the GPU it goes as one packed int64 tensor in one broadcast on the model's group
(NCCL), queued on the stream like a kernel: rank 0 never waits for its device to hand a step over, and
the other ranks never copy it through the host (a pageable host-to-device copy would wait for their
previous step). On the CPU the device part is host memory already and rides in the packet: one
broadcast in all.

Host packet: [command, T, B, R, N, is_decode, prefix_lens (B), extend_lens (B)], then (CPU) the device
part: input_ids, positions, out_cache_loc (T each), req_pool_indices (B), logit_rows (R), and the writes'
rows, positions and slots (N each).
"""

from __future__ import annotations

from array import array
from typing import Optional

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.tp.group import TPGroup

STEP, MEMORY, TRAINER_OP = 0, 1, 2  # commands (TRAINER_OP: tp/op_broadcast.py)
_HEADER = 6

Writes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # req_to_token rows, positions, slots


class StepChannel:
    """Rank 0's side (send) and the other ranks' side (receive) of the per-step hand-off."""

    def __init__(self, tp: TPGroup, device: torch.device, device_part_in_packet: Optional[bool] = None) -> None:
        self.tp = tp
        self.device = device
        # On the CPU the device part is already host memory: one broadcast carries the whole step.
        self.in_packet = device.type != "cuda" if device_part_in_packet is None else device_part_in_packet

    def send(self, batch: ForwardBatch, writes: Writes) -> None:
        """Rank 0: hand the step to the other ranks (they wait in their loop for a command)."""
        device_part = [batch.input_ids, batch.positions, batch.out_cache_loc, batch.req_pool_indices, batch.logit_rows]
        device_part += writes
        assert all(t.dtype == torch.int64 for t in device_part), [t.dtype for t in device_part]
        sizes = [len(batch.input_ids), batch.batch_size, len(batch.logit_rows), len(writes[0]), int(batch.is_decode)]
        header = array("q", [STEP, *sizes])
        header.extend(batch.prefix_lens_cpu)
        header.extend(batch.extend_lens_cpu)
        host = torch.frombuffer(header, dtype=torch.int64)
        payload = torch.cat(device_part)  # queued on the device; nothing waits
        if self.in_packet:
            self.tp.broadcast_ints(torch.cat([host, payload.cpu()]))
        else:
            self.tp.broadcast_ints(host)
            self.tp.broadcast_tensor(payload)

    def receive(self, packet: torch.Tensor) -> tuple[ForwardBatch, Writes]:
        """Ranks 1..: the ForwardBatch and req_to_token writes of the STEP command `packet`."""
        _, num_tokens, batch_size, num_rows, num_writes, is_decode = packet[:_HEADER].tolist()
        lens_end = _HEADER + 2 * batch_size
        lens = packet[_HEADER:lens_end].tolist()
        T, N = num_tokens, num_writes
        sizes = [T, T, T, batch_size, num_rows, N, N, N]
        if self.in_packet:
            payload = packet[lens_end:].to(self.device)
        else:
            payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
            self.tp.broadcast_tensor(payload)
        input_ids, positions, out_cache_loc, req_pool_indices, logit_rows, rows, cols, slots = payload.split(sizes)
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
