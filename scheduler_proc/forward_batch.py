"""ForwardBatch: the tensors of one forward step, for any mix of prefill chunks and decode tokens.
It knows nothing of requests: step.py builds it from them."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np
import torch

from scheduler_proc.multimodal import ImagePart


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device: through pinned memory with an
    asynchronous copy. (`torch.tensor(values, device="cuda")` waits until the stream is idle, which
    would stall the next step's preparation behind the step in flight.) The list is read by numpy,
    about 3x faster than torch.tensor: a prefill step's index lists hold tens of thousands of ints."""
    host = torch.from_numpy(np.array(values, dtype=_numpy_dtype(dtype)))
    if device.type != "cuda":
        return host
    pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    return pinned.copy_(host).to(device, non_blocking=True)


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def to_device_int64(*lists: list[int], device: torch.device) -> list[torch.Tensor]:
    """Several host lists of ints as int64 device tensors, in one pinned buffer and one copy: a step's
    index arrays, whose separate copies (a pinned allocation and a launch each) cost more host time
    than their bytes. The tensors are views of one device buffer, each starting 16-byte aligned: Triton
    compiles a kernel anew for a pointer of another alignment, which in a timed run costs a second."""
    flat, starts = [], []
    for values in lists:
        starts.append(len(flat))
        flat.extend(values)
        flat.extend([0] * (len(values) % 2))
    buffer = to_device(flat, torch.int64, device)
    return [buffer[start : start + len(values)] for start, values in zip(starts, lists)]


class StepAttention(Protocol):
    """What a model's attention layers call: the backend planned for this step (attention/base.py)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor: ...


@dataclass
class ForwardBatch:
    """One step over B sequences; sequence i adds extend_lens[i] tokens after prefix_lens[i] cached ones.

    Tokens are packed: input_ids, positions and out_cache_loc have one row per new token (T rows).
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: KV slots the new tokens are written to
    req_pool_indices: torch.Tensor  # [B] int64: rows of req_to_token
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    logit_rows: torch.Tensor  # [R] int64: rows of the packed tokens whose logits are needed
    is_decode: bool  # every sequence adds exactly one token
    attention: Optional[StepAttention] = None
    # Vision-language models (multimodal.py): positions for RoPE where they differ from the KV positions,
    # [T] or M-RoPE's [3, T]; and the image embeddings that replace image tokens' rows.
    rope_positions: Optional[torch.Tensor] = None
    image_parts: list[ImagePart] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def seq_lens_cpu(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens_cpu, self.extend_lens_cpu)]
