"""A launched step whose outputs are not read yet: the one owner of overlap scheduling's state.

With overlap, step N+1 is built and queued before step N's sampled ids reach the host. A request that
samples in step N counts that token as pending (req.pending) until N is read, and step N+1 may decode
it: its input id is taken on the device from N's sampled ids, so the host never waits for them.
"""

from __future__ import annotations

import torch

from scheduler_proc.forward_batch import ForwardBatch, to_device
from scheduler_proc.model_runner import StepOutput
from scheduler_proc.request import Request
from scheduler_proc.step import Step


class InFlight:
    """A launched step: its entries, what the device computes for it, and the requests whose next
    token it samples (each with its row of the sampled ids)."""

    def __init__(self, step: Step, output: StepOutput, completed: list[bool]) -> None:
        self.step = step
        self.output = output
        self.completed = completed  # per entry: this step finished its prefill
        self.sample_row: dict[Request, int] = {}
        for row, i in enumerate(step.sample_entries):
            req = step.entries[i][0]
            req.pending += 1
            self.sample_row[req] = row

    @torch.inference_mode()
    def fill_input_ids(self, batch: ForwardBatch, pending_inputs: list[tuple[int, Request]]) -> None:
        """Put the tokens this step samples into the next step's input ids, at the rows that decode them."""
        rows = [row for row, _ in pending_inputs]
        sample_rows = [self.sample_row[req] for _, req in pending_inputs]
        device = batch.input_ids.device
        sampled = self.output.sampled
        assert sampled is not None
        batch.input_ids[to_device(rows, torch.int64, device)] = sampled.ids[to_device(sample_rows, torch.int64, device)]

    def tokens_read(self) -> None:
        """Its sampled tokens are read now (or lost with a failed step): no longer pending."""
        for req in self.sample_row:
            req.pending -= 1
