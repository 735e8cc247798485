"""The attention backend interface: plan once per step, then attend per layer over the KV pool."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.kv_pool import KVPool


class AttentionBackend(ABC):
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Build this step's index structures; shared by every layer."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """Store k, v [T, Hkv, D] at the step's out_cache_loc, attend q [T, Hq, D]; returns [T, Hq*D]."""
