"""A launched step whose outputs are not read yet: the one owner of overlap scheduling's state.

With overlap, step N+1 is built and queued before step N's sampled ids reach the host. A request that
samples in step N counts that token as pending (req.pending) until N is read, and step N+1 may decode
it: its input id is taken on the device from N's sampled ids, so the host never waits for them.

A step with constrained rows (grammar_mask.py) is launched without its sampling, whose mask needs each row's
previous token in its matcher: it samples once that token is read (with overlap, in the next turn, after
step N+1 is scheduled and before it is launched, so that the device computes step N's forward while the
host schedules). Its requests' rows are withheld from that schedule: a row freed by a request that ended
meanwhile must not pass to a new request before this step's sampling has read and written it.
"""

from __future__ import annotations

import torch

from scheduler_proc.forward_batch import ForwardBatch, to_device
from scheduler_proc.grammar_mask import TokenMasks
from scheduler_proc.model_runner import ModelRunner, StepOutput
from scheduler_proc.request import Request
from scheduler_proc.step import Step


class InFlight:
    """A launched step: its entries, what the device computes for it, and the requests whose next
    token it samples (each with its row of the sampled ids)."""

    def __init__(self, step: Step, output: StepOutput, completed: list[bool]) -> None:
        self.step = step
        self.output = output
        self.completed = completed  # per entry: this step finished its prefill
        # Launched without its sampling: a constrained row's mask waits for its previous token (grammar_mask.py).
        self.awaiting_sample = step.sampling is not None and output.sampled is None
        self.sample_row: dict[Request, int] = {}
        for row, i in enumerate(step.sample_entries):
            req = step.entries[i][0]
            req.pending += 1
            self.sample_row[req] = row
        self.pool_rows = [req.row for req in self.sample_row] if self.awaiting_sample else []
        self.sample_reqs = [step.entries[i][0] for i in step.sample_entries]  # in sampling-row order

    def rows_to_withhold(self) -> list[int]:
        """The request rows its sampling, not queued yet, will read (none once it is queued)."""
        return self.pool_rows if self.awaiting_sample else []

    @torch.inference_mode()
    def fill_input_ids(self, batch: ForwardBatch, pending_inputs: list[tuple[int, Request]]) -> None:
        """Put the tokens this step samples into the next step's input ids, at the rows that decode them."""
        rows = [row for row, _ in pending_inputs]
        sample_rows = [self.sample_row[req] for _, req in pending_inputs]
        device = batch.input_ids.device
        sampled = self.output.sampled
        assert sampled is not None
        batch.input_ids[to_device(rows, torch.int64, device)] = sampled.ids[to_device(sample_rows, torch.int64, device)]

    def fill_mask_ahead(self, masks: TokenMasks) -> None:
        """With overlap: start filling the mask of a step yet to sample, once the step before it is read (its
        matchers are current then); sample() takes it."""
        if self.awaiting_sample:
            masks.fill_ahead(self.sample_reqs)

    def sample(self, runner: ModelRunner, masks: TokenMasks) -> None:
        """Queue the sampling of a step launched without it, once each of its constrained requests has its
        previous token in its matcher (with overlap: once the step before this one has been read). Call it
        before the next step is launched: that step's input ids are what this one samples."""
        if not self.awaiting_sample:
            return
        self.awaiting_sample = False
        sampling = self.step.sampling
        assert sampling is not None
        reqs = self.sample_reqs
        sampling.grammar_mask = masks.fill(reqs)
        runner.sample(self.output, sampling, masked_logprobs=any(req.msg.return_logprob for req in reqs))

    def tokens_read(self) -> None:
        """Its sampled tokens are read now (or lost with a failed step): no longer pending."""
        for req in self.sample_row:
            req.pending -= 1
