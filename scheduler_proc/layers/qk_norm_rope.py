"""Per-head q/k RMSNorm and RoPE in one GPU kernel (Triton), in place: what Qwen3's attention does to q and k
before attention, done otherwise as three kernels a layer (q's norm, k's norm, RoPE). Each program takes one
token's heads, all of q's and all of k's, normalises each head over its last dimension with its norm's
weight, rounds to the activations' dtype (where the separate norm wrote its output), and rotates the two
halves (NeoX layout) by the token's cos/sin row of the rotary table (rotary.py's cos_sin_cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(x, row_stride, num_heads, weight, cos, sin, t, eps, HEADS: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    inside = heads < num_heads
    first = x + t * row_stride + heads * (2 * HALF) + cols
    x1 = tl.load(first, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(weight + cols).to(tl.float32)
    w2 = tl.load(weight + HALF + cols).to(tl.float32)
    y1 = (x1 * rstd * w1).to(x.dtype.element_ty).to(tl.float32)
    y2 = (x2 * rstd * w2).to(x.dtype.element_ty).to(tl.float32)
    tl.store(first, (y1 * cos - y2 * sin).to(x.dtype.element_ty), mask=inside)
    tl.store(first + HALF, (y2 * cos + y1 * sin).to(x.dtype.element_ty), mask=inside)


@triton.jit
def _qk_norm_rope(
    q,
    k,
    q_stride,
    k_stride,
    positions,
    table,
    q_weight,
    k_weight,
    num_q_heads,
    num_k_heads,
    eps,
    Q_HEADS: tl.constexpr,
    K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = table + tl.load(positions + t).to(tl.int64) * (2 * HALF)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(row + cols).to(tl.float32)
    sin = tl.load(row + HALF + cols).to(tl.float32)
    _norm_rope_heads(q, q_stride, num_q_heads, q_weight, cos, sin, t, eps, Q_HEADS, HALF)
    _norm_rope_heads(k, k_stride, num_k_heads, k_weight, cos, sin, t, eps, K_HEADS, HALF)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
) -> None:
    """q [T, Hq, D] and k [T, Hk, D] (views whose heads and dims are contiguous, tokens strided, as slices of
    the q|k|v projection) normalised per head and rotated at positions [T], in place."""
    tokens, num_q_heads, head_dim = q.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and k.stride(2) == 1 and k.stride(1) == head_dim
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.is_contiguous()
    if tokens:
        _qk_norm_rope[(tokens,)](
            q,
            k,
            q.stride(0),
            k.stride(0),
            positions,
            cos_sin_cache,
            q_weight,
            k_weight,
            num_q_heads,
            k.shape[1],
            eps,
            Q_HEADS=triton.next_power_of_2(num_q_heads),
            K_HEADS=triton.next_power_of_2(k.shape[1]),
            HALF=head_dim // 2,
        )
