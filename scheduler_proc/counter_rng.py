"""The sampler's random numbers: one uniform per sampled row from a splitmix64-style hash of the request's seed
and the position being sampled (a counter), so a request's draws depend on them alone, never on its batch.
The torch version is here; the fused GPU sampler computes the same bits in its kernel (fused_sample.py)."""

from __future__ import annotations

import torch


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64's multipliers and the golden-ratio step, as int64 (torch has no uint64 arithmetic)
MIX1, MIX2, GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)
MASK53 = (1 << 53) - 1  # a float64 mantissa's bits


def row_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) per row, float32, from seeds [S] int64 and positions [S]."""
    z = seeds * MIX1 + positions.to(torch.int64) * GOLDEN
    z = (z ^ (z >> 30)) * MIX1
    z = (z ^ (z >> 27)) * MIX2
    z = z ^ (z >> 31)  # torch shifts are arithmetic: this clears the sign bit, so take the low 53 bits
    return (z & MASK53).to(torch.float64).div_(float(1 << 53)).to(torch.float32)
