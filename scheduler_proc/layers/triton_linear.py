"""A Triton GEMM for decode-sized linear layers, y = x @ weight.T (+ bias), with FP8 operands' scales (x per row,
the weight per output row) applied in its epilogue as torch._scaled_mm does. The FP8 layers use it at the shapes
where it measured faster than _scaled_mm (fp8_config; layers/fp8.py); the bf16 layers stay on cuBLAS, which
was faster at nearly every decode shape of our three models (lease Q, scripts/bench_gemm.py).

Why it exists: at a decode step's 256 rows the four GEMMs of a Qwen2.5-0.5B layer took 30.4 us on the H200
(lease O), where their 30 MB of weights take 7 us at full bandwidth. Their grids are small: 256 x 896 output
in 128 x 128 tiles is 14 programs for 132 SMs. Here the tile, the split of K and the pipelining are parameters
(LinearConfig) for the benchmark to sweep; the split partials are summed in a second, deterministic kernel (no
atomics: the same inputs give the same bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

_SMS = 132  # an H100/H200's: what the default split aims to fill


@dataclass(frozen=True)
class LinearConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, n: int, k: int) -> LinearConfig:
    """64 x 64 tiles (a decode step's rows are few), K split to fill the SMs (_filling_split)."""
    return LinearConfig(split_k=_filling_split(triton.cdiv(m, 64) * triton.cdiv(n, 64), k, 64))


def fp8_config(m: int, n: int, k: int) -> Optional[LinearConfig]:
    """The tiling for an FP8 matmul of m rows where this kernel measured faster than torch._scaled_mm, else
    None. H200, lease Q (bench_gemm.py --fp8, Llama-3.1-8B's and Qwen3-0.6B's layers at 64, 256 and 512 rows):
    64 x 64 tiles over 128-wide K blocks, K split to fill the SMs, won wherever the grid has at most 256 such
    tiles, or the rows are at most 64 (e.g. Llama's o_proj at 64 rows 8.0 against 12.9 us, Qwen3's down_proj
    at 256 rows 7.0 against 10.7); with more tiles cuBLAS's larger ones won (Llama's gate_up at 512 rows
    101 us against 167)."""
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    if m > 64 and tiles > 256:
        return None
    return LinearConfig(block_k=128, split_k=_filling_split(tiles, k, 128))


def _filling_split(tiles: int, k: int, block_k: int) -> int:
    """K split in two until the grid of `tiles` covers the SMs about once, while each split keeps at least four
    K blocks to pipeline."""
    split = 1
    while tiles * split * 2 <= _SMS and triton.cdiv(k, block_k * split * 2) >= 4:
        split *= 2
    return split


@triton.jit
def _linear(
    x_ptr,
    w_ptr,
    bias_ptr,
    x_scale_ptr,  # [M] float32 when SCALED
    w_scale_ptr,  # [N] float32 when SCALED
    out_ptr,  # [M, N] in the output dtype, or [SPLIT_K, M, N] float32 partials
    M,
    N,
    K,
    stride_x,
    stride_w,
    k_per_split,  # a whole number of K blocks
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
):
    # Row blocks vary fastest: the programs that read one weight tile run side by side and share it in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * k_per_split + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, k_per_split // BLOCK_K):
        k_in = (ks + i * BLOCK_K) < K
        x = tl.load(x_ptrs, mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(cols[:, None] < N) & k_in[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALED:  # each partial scaled alike: their sum is the scaled sum
        x_scale = tl.load(x_scale_ptr + rows, mask=rows < M, other=0.0)
        acc *= x_scale[:, None] * tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(out_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :], acc, mask=inside)


@triton.jit
def _sum_splits(
    partial_ptr, bias_ptr, out_ptr, total, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # in split order: the same sum every time
        acc += tl.load(partial_ptr + s * total + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def triton_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    config: Optional[LinearConfig] = None,
    scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]), accumulated in float32, in out_dtype (default x's dtype).
    scales: (x's [rows] or [rows, 1], weight's [N]) float32 scales of FP8 operands, multiplied in."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    assert weight.stride(-1) == 1 and weight.shape[1] == k, (tuple(weight.shape), k)
    m, n = rows.shape[0], weight.shape[0]
    cfg = config or default_config(m, n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    target = out if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _linear[grid](
        rows,
        weight,
        bias if bias is not None else weight,  # not read without HAS_BIAS
        scales[0] if scales else weight,  # not read without SCALED
        scales[1] if scales else weight,
        target,
        m,
        n,
        k,
        rows.stride(0),
        weight.stride(0),
        k_per_split,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        HAS_BIAS=bias is not None and cfg.split_k == 1,
        SCALED=scales is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.split_k > 1:
        total = m * n
        _sum_splits[(triton.cdiv(total, 1024),)](
            target,
            bias if bias is not None else target,
            out,
            total,
            n,
            SPLIT_K=cfg.split_k,
            HAS_BIAS=bias is not None,
            BLOCK=1024,
        )
    return out.reshape(*x.shape[:-1], n)
