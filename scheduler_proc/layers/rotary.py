"""Rotary position embedding (NeoX layout, as Llama and Qwen), with Llama-3 frequency scaling."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from scheduler_proc.layers.kernels import flashinfer_for


def rope_parameters(config: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, scaling) from either the legacy keys or transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or params
    if (scaling.get("rope_type") or scaling.get("type") or "default") == "default":
        scaling = None
    return theta, scaling


def _inv_freq(dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [T, Hq, D] and k [T, Hk, D] at the given positions, in place."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict[str, Any]]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self._settings = (max_positions, theta, scaling)
        self.register_buffer("cos_sin_cache", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos_sin_cache.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the cos/sin table (again after the model is materialised from the meta device)."""
        max_positions, theta, scaling = self._settings
        with torch.device("cpu"):
            inv_freq = _inv_freq(self.head_dim, theta, scaling)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: cos half then sin half, the layout flashinfer's kernel reads.
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        fi = flashinfer_for(q)
        if fi is not None:
            fi.apply_rope_with_cos_sin_cache_inplace(
                positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1), self.head_dim, self.cos_sin_cache, True
            )
            return
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each, float32
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)
        q.copy_(q * cos + _rotate_half(q) * sin)
        k.copy_(k * cos + _rotate_half(k) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
