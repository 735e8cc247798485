"""The attention backend interface: plan once per step, then attend per layer over the KV pool."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.kv_pool import KVPool


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention computes beyond causal softmax(q.k / sqrt(head_dim)); layers that are
    alike share one plan per step."""

    window: Optional[int] = None  # a query sees itself and the window - 1 keys before it; None: every key
    scale: Optional[float] = None  # of q.k; None: head_dim ** -0.5
    softcap: Optional[float] = None  # scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2)


class AttentionBackend(ABC):
    decode_kernel = "torch"  # what runs decode steps (server info "decode_attention_backend")

    def __init__(self, pool: KVPool, layers: Optional[list[LayerAttention]] = None) -> None:
        self.pool = pool
        self.layers = layers or [LayerAttention()] * pool.k_buffer.shape[0]

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Build this step's index structures; shared by every layer."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        """Store k, v [T, Hkv, D] at the step's out_cache_loc, attend q [T, Hq, D]; returns [T, Hq*D]."""
