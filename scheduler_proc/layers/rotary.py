"""Rotary position embedding (NeoX layout, as Llama and Qwen), with linear, Llama-3 and LongRoPE (Phi-3)
frequency scaling.

LongRoPE has two sets of frequencies; HF picks one per forward pass from the sequence's length, which
a KV cache cannot follow (keys already cached keep their rotation). Here each position keeps one:
positions below original_max_position_embeddings rotate with the short factors, later ones with the long
factors; a sequence that stays below that length gets exactly HF's rotation."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from scheduler_proc.layers.kernels import FLASHINFER_HEAD_DIMS, flashinfer_for


def rope_parameters(config: dict[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, scaling) from either the legacy keys or transformers 5's `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind in ("longrope", "su"):  # Phi-3 keeps these two beside the scaling, not in it
        original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
        extra = {
            "original_max_position_embeddings": original,
            "max_position_embeddings": config.get("max_position_embeddings"),
        }
        scaling = {**scaling, **extra}
    return theta, scaling


def _inv_freq(dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3, longrope)")
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _longrope_freqs(
    positions: torch.Tensor, dim: int, theta: float, scaling: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """[positions, dim / 2] angles (short factors below the original length, long from there) and the
    attention factor HF multiplies cos and sin by."""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or int(scaling["max_position_embeddings"]) / original
    mscale = scaling.get("attention_factor")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * theta**exponent)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * theta**exponent)
    inv_freq = torch.where(positions[:, None] < original, short[None, :], long[None, :])
    return positions[:, None] * inv_freq, float(mscale)


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
            positions = torch.arange(max_positions, dtype=torch.float32)
            kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
            if kind in ("longrope", "su"):
                freqs, mscale = _longrope_freqs(positions, self.head_dim, theta, scaling)
            else:
                freqs, mscale = torch.outer(positions, _inv_freq(self.head_dim, theta, scaling)), 1.0
        # [max_positions, head_dim]: cos half then sin half, the layout flashinfer's kernel reads.
        cache = torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1)
        self.cos_sin_cache = cache.to(self.cos_sin_cache.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        fi = flashinfer_for(q)
        if fi is not None and self.head_dim in FLASHINFER_HEAD_DIMS:
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
