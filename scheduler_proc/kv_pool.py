"""The token-granular KV pool: per-layer K/V buffers, a free list of slots, and the request-to-token table.

Slot 0 is never handed out: padded rows of a CUDA-graph batch write their KV there.

Under tensor parallelism only rank 0 allocates, but every rank's attention reads req_to_token, so
rank 0 keeps a journal of its writes to the table and ships it with the next step (tp/step_broadcast.py).

An FP8 pool (kv_cache_dtype="fp8_e4m3") holds keys / k_scale and values / v_scale in e4m3, per layer
scales from the checkpoint or 1.0: half the bytes of a bf16 pool, so twice the tokens in the same memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional, Union

import torch

FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max
# Freed slots wait in this many chunks before they join the free list in one copy: the list holds every
# free slot of the pool (10M on an H200 for a small model), and copying it at each free cost a request's
# finish ~50 us of device time on the GPU and ~1.4 ms of host time on the CPU.
_MERGE_CHUNKS = 256


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_requests: int,
        max_context: int,
        compute_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.num_slots = num_slots
        self.device = device
        self.compute_dtype = compute_dtype or dtype  # of the queries, and of keys and values read back
        self.kv_scales = [(1.0, 1.0)] * num_layers  # each layer's (k_scale, v_scale): stored = value / scale
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.v_buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.req_to_token = torch.zeros((max_requests, max_context), dtype=torch.int32, device=device)
        self._free_slots = torch.arange(1, num_slots, dtype=torch.int64, device=device)
        self._returned: list[torch.Tensor] = []  # freed since the last merge into _free_slots
        self._num_returned = 0
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self.max_requests = max_requests
        self.journal: Optional[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None

    def keep_journal(self) -> None:
        """Record every req_to_token write from now on, for take_journal()."""
        self.journal = []

    def set_tokens(self, rows: Union[int, torch.Tensor], positions: torch.Tensor, slots: torch.Tensor) -> None:
        """req_to_token[rows, positions] = slots: the only way the table is written, so that a journal
        can replay every write on another rank."""
        if isinstance(rows, int):
            rows = torch.full_like(positions, rows)
        self.req_to_token[rows, positions] = slots.to(torch.int32)
        if self.journal is not None:
            self.journal.append((rows, positions, slots))

    def take_journal(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, positions, slots) of every write since the last call, as int64 tensors on the device."""
        assert self.journal is not None
        writes, self.journal = self.journal, []
        if not writes:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty, empty
        if len(writes) == 1:  # a decode step's one write: no copies (three kernel launches) to join it
            return tuple(t.to(torch.int64) for t in writes[0])  # type: ignore[return-value]
        return tuple(torch.cat([w[i].to(torch.int64) for w in writes]) for i in range(3))  # type: ignore[return-value]

    @property
    def is_fp8(self) -> bool:
        return self.k_buffer.dtype == FP8

    def set_kv_scales(self, scales: dict[int, list[float]]) -> None:
        """A checkpoint's per-layer [k_scale, v_scale] (layers it does not list keep 1.0). They scale what
        an FP8 pool stores; a bf16 pool stores keys and values as they are, so its scales stay 1.0 (the
        Triton decode, which multiplies by them whatever the pool, read an FP8 checkpoint's 0.5 / 0.25
        over a bf16 pool in lease N)."""
        if self.is_fp8:
            self.kv_scales = [tuple(scales.get(i, (1.0, 1.0))) for i in range(len(self.kv_scales))]

    def to_pool_dtype(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Keys or values as the pool stores them: x itself, or x / scale in e4m3 in an FP8 pool."""
        if not self.is_fp8:
            return x
        return (x if scale == 1.0 else x / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)

    @property
    def capacity(self) -> int:
        """Slots a request can ever use (all but the dummy slot)."""
        return self.num_slots - 1

    @property
    def bytes(self) -> int:
        return 2 * self.k_buffer.numel() * self.k_buffer.element_size()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def num_free_slots(self) -> int:
        return self._free_slots.numel() + self._num_returned

    def alloc_slots(self, n: int) -> torch.Tensor:
        if n > self._free_slots.numel() and self._returned:
            self._merge_returned()
        assert n <= self._free_slots.numel(), (n, self._free_slots.numel())
        slots, self._free_slots = self._free_slots[:n], self._free_slots[n:]
        return slots

    def free_slots(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._returned.append(slots.to(torch.int64))
            self._num_returned += slots.numel()
            if len(self._returned) >= _MERGE_CHUNKS:
                self._merge_returned()

    def _merge_returned(self) -> None:
        self._free_slots = torch.cat([self._free_slots, *self._returned])
        self._returned, self._num_returned = [], 0

    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    @contextmanager
    def rows_withheld(self, rows: Iterable[int]) -> Iterator[None]:
        """Inside the block, none of `rows` is handed out, even if free."""
        held = set(rows)
        # Held rows are in-flight requests' rows, free only where one ended meanwhile: mostly none are.
        if not held or held.isdisjoint(self._free_rows):
            yield
            return
        kept = [r for r in self._free_rows if r in held]
        self._free_rows = [r for r in self._free_rows if r not in held]
        try:
            yield
        finally:
            self._free_rows += kept
