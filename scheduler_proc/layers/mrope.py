"""Multimodal RoPE (Qwen2-VL's M-RoPE): each token has three positions (time, height, width) and each
band of rotary frequencies (`mrope_section`, in frequency pairs) turns with one of them.

A token whose three positions are equal (any text token) rotates exactly as plain RoPE at that
position, so 1-D positions go to the plain rotary layer (and its fused kernel); only steps that hold
image tokens take the [3, T] path here, in torch.
"""

from __future__ import annotations

import torch
from torch import nn

from scheduler_proc.layers.rotary import RotaryEmbedding


class MRotaryEmbedding(nn.Module):
    """Applies M-RoPE to q [T, Hq, D] and k [T, Hk, D] in place, at positions [3, T] or [T]."""

    def __init__(self, rope: RotaryEmbedding, mrope_section: list[int]) -> None:
        super().__init__()
        if sum(mrope_section) * 2 != rope.head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {rope.head_dim // 2}")
        self.rope = rope
        self.mrope_section = list(mrope_section)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        if positions.dim() == 1:
            self.rope(positions, q, k)
            return
        half = self.rope.head_dim // 2
        table = self.rope.cos_sin_cache[positions]  # [3, T, D]: cos half then sin half, float32
        cos = _interleave_sections(table[..., :half], self.mrope_section)
        sin = _interleave_sections(table[..., half:], self.mrope_section)
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)
        q.copy_(q * cos + _rotate_half(q) * sin)
        k.copy_(k * cos + _rotate_half(k) * sin)


def _interleave_sections(values: torch.Tensor, sections: list[int]) -> torch.Tensor:
    """[3, T, D/2] -> [T, D/2]: frequency band i takes its values from position row i % 3."""
    return torch.cat([band[i % 3] for i, band in enumerate(values.split(sections, dim=-1))], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
