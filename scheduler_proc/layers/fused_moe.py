"""Mixture-of-experts on the GPU: each expert's two matmuls as grouped GEMMs over the routed tokens (Triton).

The router's (token, choice) pairs are sorted by expert and each expert's run of pairs is padded to a
multiple of BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to one expert. One program
multiplies one tile's input rows by its expert's weight, BLOCK_N output columns at a time: the first GEMM
gives [gate | up] per pair, the second down per pair, scaled by the pair's routing weight; a token's k
pairs are then summed. The per-expert loop (layers/moe.py: expert_loop) launches two matmuls per expert
and reads the expert counts back to the host; here nothing waits for the host, so a decode step with
experts is captured in a CUDA graph like any other. Tested on CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scheduler_proc.layers.activation import SiluAndMul

_SILU_AND_MUL = SiluAndMul()  # flashinfer's kernel on CUDA


@triton.jit
def _grouped_gemm(
    a,
    b,
    c,
    sorted_pairs,
    tile_expert,
    num_padded,
    pair_weights,
    N,
    K,
    num_pairs,
    pairs_per_a_row,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    num_tiles_m,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """c[pair, n] = sum_k a[pair // pairs_per_a_row, k] * b[expert(pair), n, k] (* weight[pair])."""
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    # Tiles in groups of GROUP_M rows, so neighbouring programs share a tile of the expert's weight in L2.
    per_group = GROUP_M * num_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded):
        return  # past the last expert's padded rows (the grid is sized for the worst case)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs + rows)
    valid = pairs < num_pairs  # padding rows hold num_pairs
    expert = tl.load(tile_expert + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a + (pairs // pairs_per_a_row).to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = b + expert * stride_be + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a_tile = tl.load(a_ptrs, mask=valid[:, None] & (ks[None, :] < k_left), other=0.0)
        b_tile = tl.load(b_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a_tile, b_tile)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(pair_weights + pairs, mask=valid, other=0.0)[:, None]
    c_ptrs = c + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, choice) pairs sorted by expert, each expert's run padded to a multiple of block_m:
    (sorted pair indices with padding = num_pairs, the expert of each block_m tile, the padded length [1]).
    Sized for the worst case from host-known numbers, so that no device value is read back."""
    flat = ids.flatten()
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(num_pairs, device=ids.device) - (counts.cumsum(0) - counts)[experts]
    capacity = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=ids.device)
    sorted_pairs[(ends - padded)[experts] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, capacity, block_m, device=ids.device)
    tile_expert = torch.searchsorted(ends, tile_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_pairs, tile_expert, ends[-1:]


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile: small when few pairs reach each expert (decode), so padding wastes little."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def _gemm(a, b, c, aligned, pairs_per_a_row: int, weights, block_m: int) -> None:
    sorted_pairs, tile_expert, num_padded = aligned
    num_tiles_m = sorted_pairs.numel() // block_m
    n, k = b.shape[1], b.shape[2]
    block_n, block_k = 64, 64
    grid = (num_tiles_m * triton.cdiv(n, block_n),)
    _grouped_gemm[grid](
        a,
        b,
        c,
        sorted_pairs,
        tile_expert,
        num_padded,
        weights if weights is not None else c,
        n,
        k,
        c.shape[0],
        pairs_per_a_row,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        num_tiles_m,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        num_warps=4,
        num_stages=3,
    )


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The same result as moe.expert_loop: x [T, H], w13 [E, 2I, H], w2 [E, H, I] (contiguous), routing
    weights [T, k] and expert ids [T, k] -> [T, H]."""
    num_tokens, top_k = ids.shape
    num_experts, two_i, hidden = w13.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    block_m = _block_m(num_pairs, num_experts)
    aligned = align_pairs(ids, num_experts, block_m)
    gate_up = x.new_empty(num_pairs, two_i)
    _gemm(x.contiguous(), w13, gate_up, aligned, top_k, None, block_m)
    act = _SILU_AND_MUL(gate_up).contiguous()
    out = x.new_empty(num_pairs, hidden)
    _gemm(act, w2, out, aligned, 1, weights.flatten().float().contiguous(), block_m)
    return out.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
