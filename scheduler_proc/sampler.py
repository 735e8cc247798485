"""Batched sampling: every request's own parameters applied in one pass over the batch's logits.

Parameters live in per-request-row tensors on the device, written once when a request is admitted (on
the host, copied over before the next sampling), so a step only gathers rows. Randomness is a
counter-based hash of (seed, position, token id): a request's samples depend on its seed and position
alone, never on which batch it ran in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from engine.shared.sampling import SamplingParams
from scheduler_proc.counter_rng import row_uniform
from scheduler_proc.forward_batch import to_device
from scheduler_proc.grammar_mask import StepMask, apply_token_mask


@dataclass
class SamplingBatch:
    """What the scheduler knows about one step's sampled rows, decided on the host."""

    rows: torch.Tensor  # [S] request rows (req_to_token rows), on the device
    positions: torch.Tensor  # [S] position of the token being sampled: the RNG counter
    logit_index: torch.Tensor  # [S] rows of the step's logits that are sampled (each entry's last)
    all_greedy: bool
    any_penalty: bool
    any_filter: bool = True  # some row uses top_k, top_p or min_p
    bias: list[tuple[int, int, float]] = field(default_factory=list)  # (batch index, token, bias)
    banned: list[tuple[int, int]] = field(default_factory=list)  # (batch index, token): min_new_tokens
    grammar_mask: Optional[StepMask] = None  # what the constrained rows' grammars allow (grammar_mask.py)


# The parameters kept per request row: floats with their neutral value, and ints (top_k's neutral value is the
# vocabulary size, set per engine).
_FLOATS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
}
_INTS = ("top_k", "seed")


def _device_row(name: str) -> property:
    """The [max_requests] device tensor of one parameter, current as of the last admission."""
    ints = name in _INTS
    index = _INTS.index(name) if ints else list(_FLOATS).index(name)

    def read(self: SamplingState) -> torch.Tensor:
        self._upload()
        return (self._ints if ints else self._floats)[index]

    return property(read)


class SamplingState:
    """Sampling parameters per request row, and token counts for the penalties."""

    temperature = _device_row("temperature")
    top_p = _device_row("top_p")
    min_p = _device_row("min_p")
    frequency_penalty = _device_row("frequency_penalty")
    presence_penalty = _device_row("presence_penalty")
    repetition_penalty = _device_row("repetition_penalty")
    top_k = _device_row("top_k")
    seed = _device_row("seed")

    def __init__(self, max_requests: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        # Admission writes a row here on the host; the rows go to the device in one copy before the next
        # sampling reads them. (Eight scalar writes into device tensors were eight launches per request:
        # ~60 us of host time each admission on a GPU, 1,024 of them in the `prefix` workload's prefill.)
        neutral = np.array(list(_FLOATS.values()), dtype=np.float32)
        self._host_floats = np.repeat(neutral[:, None], max_requests, axis=1)
        self._host_ints = np.zeros((len(_INTS), max_requests), dtype=np.int64)
        self._host_ints[_INTS.index("top_k")] = vocab_size  # every token
        self._floats = torch.from_numpy(self._host_floats).to(device)
        self._ints = torch.from_numpy(self._host_ints).to(device)
        self._dirty = False
        self.max_requests = max_requests
        self._output_counts: Optional[torch.Tensor] = None  # [rows, V] int32, made on first use
        self._seen: Optional[torch.Tensor] = None  # [rows, V] bool: prompt or output tokens
        self._masked_kernels_built = False

    def admit(
        self, row: int, params: SamplingParams, seed: int, prompt_ids: list[int], output_ids: Sequence[int] = ()
    ) -> None:
        """Write a request's parameters into its row; output_ids: tokens it generated before a
        retraction, counted again so penalties resume where they were."""
        top_k = min(params.top_k, self.vocab_size) if params.top_k > 0 else self.vocab_size
        self._host_floats[:, row] = [getattr(params, name) for name in _FLOATS]
        self._host_ints[:, row] = (top_k, seed)
        self._dirty = True
        if params.uses_penalties:
            counts, seen = self._penalty_tables()
            counts[row].zero_()
            seen[row].zero_()
            seen[row, torch.tensor(prompt_ids, dtype=torch.int64, device=self.device)] = True
            if output_ids:
                ids = torch.tensor(list(output_ids), dtype=torch.int64, device=self.device)
                counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
                seen[row, ids] = True

    def _upload(self) -> None:
        """The rows admitted since the last sampling, to the device (queued on the stream, before the reads)."""
        if not self._dirty:
            return
        self._dirty = False
        for host, on_device in ((self._host_floats, self._floats), (self._host_ints, self._ints)):
            if on_device.is_cuda:  # through pinned memory: the host rows may change again before the copy runs
                host = torch.empty(host.shape, dtype=on_device.dtype, pin_memory=True).copy_(torch.from_numpy(host))
                on_device.copy_(host, non_blocking=True)
            else:
                on_device.copy_(torch.from_numpy(host))

    def record(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count sampled tokens for requests that use penalties (rows with neutral values cost nothing)."""
        if self._output_counts is None:
            return
        self._output_counts[rows, token_ids] += 1
        self._seen[rows, token_ids] = True

    def _penalty_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._output_counts is None:
            shape = (self.max_requests, self.vocab_size)
            self._output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        return self._output_counts, self._seen

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The step's logits [R, V] (left unmodified) -> next token ids [S] int64 of its rows batch.logit_index,
        within what each constrained row's grammar allows (batch.grammar_mask)."""
        mask = batch.grammar_mask
        if self._plain(batch) and logits.is_cuda:  # one kernel reads the rows in place, and the mask with them
            return self._fused(logits, batch.logit_index, batch, mask)
        rows = logits[batch.logit_index].float()
        if mask is not None:
            apply_token_mask(rows, mask)
        return self.sample_rows(rows, batch)

    def sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits [S, V] float32, a copy (modified in place; grammar-masked already) -> next token ids [S] int64."""
        if self._plain(batch) and logits.is_cuda:
            return self._fused(logits, torch.arange(logits.shape[0], device=logits.device), batch, None)
        # A constrained row whose every allowed token is biased away or banned (min_new_tokens) keeps the
        # grammar's choice: the grammar must end somewhere, and nothing else could follow.
        allowed = logits.clone() if batch.grammar_mask is not None and (batch.bias or batch.banned) else None
        if batch.bias:
            index, token, value = zip(*batch.bias)
            logits[self._ids(index), self._ids(token)] += to_device(list(value), torch.float32, self.device)
        if batch.any_penalty and self._output_counts is not None:
            self._apply_penalties(logits, batch.rows)
        if batch.banned:
            index, token = zip(*batch.banned)
            logits[self._ids(index), self._ids(token)] = float("-inf")
        if allowed is not None:
            logits = torch.where(torch.isneginf(logits).all(dim=-1, keepdim=True), allowed, logits)
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        temperature = self.temperature[batch.rows]
        greedy = temperature == 0.0
        probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)
        if batch.any_filter:
            probs = self._filter(probs, batch.rows)
        # Inverse CDF with one uniform per row: token i is picked with probability p_i, and a
        # zero-probability token never (the CDF does not rise there).
        cdf = probs.cumsum(dim=-1)
        target = row_uniform(self.seed[batch.rows], batch.positions) * cdf[:, -1]
        sampled = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _plain(batch: SamplingBatch) -> bool:
        """Temperature (or greedy) alone: what the fused kernel does."""
        return not (batch.bias or batch.banned or batch.any_penalty or batch.any_filter)

    def _fused(
        self, logits: torch.Tensor, index: torch.Tensor, batch: SamplingBatch, mask: Optional[StepMask]
    ) -> torch.Tensor:
        from scheduler_proc.fused_sample import fused_sample

        rows, grammar = batch.rows, {}
        if mask is not None:
            if not self._masked_kernels_built:
                self._build_masked_kernels(logits, index, batch, mask)
            grammar = {"bits": mask.bits, "bits_vocab": mask.vocab, "constrained": mask.constrained}
        return fused_sample(
            logits, index, self.temperature[rows], seeds=self.seed[rows], positions=batch.positions, **grammar
        )

    def _build_masked_kernels(
        self, logits: torch.Tensor, index: torch.Tensor, batch: SamplingBatch, mask: StepMask
    ) -> None:
        """Triton builds one kernel for steps whose every row is constrained (no row flags) and one for mixed
        steps: build both at the first constrained step, on one row of its tensors (the same dtypes and
        alignments), rather than stall every request while the other compiles the first time a step meets it."""
        from scheduler_proc.fused_sample import fused_sample

        self._masked_kernels_built = True
        row = batch.rows[:1]
        for constrained in (None, torch.ones(1, dtype=torch.bool, device=logits.device)):
            fused_sample(
                logits,
                index[:1],
                self.temperature[row],
                seeds=self.seed[row],
                positions=batch.positions[:1],
                bits=mask.bits[:1],
                bits_vocab=mask.vocab,
                constrained=constrained,
            )

    def _ids(self, values: Sequence[int]) -> torch.Tensor:
        return to_device(list(values), torch.int64, self.device)

    def _apply_penalties(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        counts = self._output_counts[rows].to(logits.dtype)
        logits -= self.frequency_penalty[rows, None] * counts
        logits -= self.presence_penalty[rows, None] * (counts > 0).to(logits.dtype)
        penalty = torch.where(self._seen[rows], self.repetition_penalty[rows, None], 1.0)
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))

    def _filter(self, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        top_k, top_p, min_p = self.top_k[rows], self.top_p[rows], self.min_p[rows]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[1], device=probs.device)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = (rank[None, :] >= top_k[:, None]) | (mass_before > top_p[:, None])
        drop |= sorted_probs < (min_p * sorted_probs[:, 0])[:, None]
        drop[:, 0] = False  # the most likely token always stays
        return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
