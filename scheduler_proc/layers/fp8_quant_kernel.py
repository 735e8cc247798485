"""Per-token FP8 quantization of activations in one GPU kernel (Triton): each program takes one row, finds
its absolute maximum, and writes the row over its scale in e4m3 and the float32 scale. A row of up to
16,384 values (every hidden and intermediate size of our models) is read once and held in registers;
a longer one is read twice, in blocks.

The same quantization also ends the two kernels that make an FP8 projection's input: RMSNorm (with the
residual add before it) and SiLU(gate) * up. They write e4m3 rows and scales in place of the bf16 rows
the next kernel would read and quantize: one pass over the activations and one launch fewer, ahead of
three of a layer's four FP8 matmuls (lease Q, Llama-3.1-8B at 512 rows: the separate quantization took
3.6, 4.6 and 15.9 us of the 224 us of those matmuls). Each rounds its result to the activations' dtype
before quantizing, as the unfused pair does (the bf16 row is what quantize_rows would have read).

In torch the same is about eight kernels (abs, amax, casts, divisions, clamps); ahead of each of a layer's
four FP8 matmuls, in every decode step, those launches would cost a large part of what FP8 saves.
Divisions round to nearest (div_rn), as torch's do, so the scales and the values before the final cast
equal torch's; the cast is the device's round-to-nearest-even, as torch's.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


_ONE_BLOCK_MAX = 16384  # the longest row held in registers whole (16 values a thread over 8 warps at 4,096)


@triton.jit
def _store_row(values, q_row, scale_row, offsets, inside, FP8_MAX: tl.constexpr):
    """values [BLOCK] float32 (0 outside the row) -> e4m3 at q_row, the row's scale at scale_row."""
    row_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(values), 0), 1e-12), FP8_MAX)
    tl.store(scale_row, row_scale)
    values = tl.minimum(tl.maximum(tl.math.div_rn(values, row_scale), -FP8_MAX), FP8_MAX)
    tl.store(q_row + offsets, values.to(q_row.dtype.element_ty), mask=inside)


@triton.jit
def _quantize_rows(x, q, scale, cols, x_stride, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # one read: the row stays in registers between its maximum and its scaling
        inside = offsets < cols
        values = tl.load(x + row * x_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        _store_row(values, q + row * cols, scale + row, offsets, inside, FP8_MAX)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            inside = start + offsets < cols
            values = tl.load(x + row * x_stride + start + offsets, mask=inside, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(values))
        row_scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), FP8_MAX)
        tl.store(scale + row, row_scale)
        for start in range(0, cols, BLOCK):
            inside = start + offsets < cols
            values = tl.load(x + row * x_stride + start + offsets, mask=inside, other=0.0).to(tl.float32)
            values = tl.minimum(tl.maximum(tl.math.div_rn(values, row_scale), -FP8_MAX), FP8_MAX)
            tl.store(q + row * cols + start + offsets, values.to(q.dtype.element_ty), mask=inside)


def quantize_rows(x: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, K] in out_dtype, scale [T, 1] float32) for x [T, K] with unit stride along K. out_dtype is
    e4m3 on the device; float32 (the values before the cast) lets a test compare them exactly on CPU."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=out_dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        whole = triton.next_power_of_2(cols)
        one_block = whole <= _ONE_BLOCK_MAX
        block = whole if one_block else 1024
        _quantize_rows[(rows,)](
            x,
            q,
            scale,
            cols,
            x.stride(0),
            FP8_MAX=FP8_MAX,
            BLOCK=block,
            ONE_BLOCK=one_block,
            num_warps=8 if block >= 4096 else 4,
        )
    return q, scale


@triton.jit
def _norm_quantize_rows(
    x,
    residual,
    weight,
    q,
    scale,
    cols,
    x_stride,
    r_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < cols
    values = tl.load(x + row * x_stride + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum is the next residual; the norm reads it unrounded, as flashinfer's fused add does
        values += tl.load(residual + row * r_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(residual + row * r_stride + offsets, values.to(residual.dtype.element_ty), mask=inside)
    inv_rms = 1.0 / tl.sqrt(tl.sum(values * values, 0) / cols + eps)
    w = tl.load(weight + offsets, mask=inside, other=0.0).to(tl.float32)
    normed = (values * inv_rms * w).to(x.dtype.element_ty).to(tl.float32)
    _store_row(normed, q + row * cols, scale + row, offsets, inside, FP8_MAX)


@triton.jit
def _silu_mul(gate_up, at, inside, cols, dtype: tl.constexpr):
    gate = tl.load(gate_up + at, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + cols + at, mask=inside, other=0.0).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate)) * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_mul_quantize_rows(
    gate_up, q, scale, cols, stride, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    source = gate_up + row * stride
    dtype = gate_up.dtype.element_ty
    if ONE_BLOCK:
        inside = offsets < cols
        _store_row(
            _silu_mul(source, offsets, inside, cols, dtype), q + row * cols, scale + row, offsets, inside, FP8_MAX
        )
    else:  # the row's maximum first, then the row again (from L2) scaled
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            inside = start + offsets < cols
            amax = tl.maximum(amax, tl.abs(_silu_mul(source, start + offsets, inside, cols, dtype)))
        row_scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), FP8_MAX)
        tl.store(scale + row, row_scale)
        for start in range(0, cols, BLOCK):
            inside = start + offsets < cols
            values = tl.math.div_rn(_silu_mul(source, start + offsets, inside, cols, dtype), row_scale)
            values = tl.minimum(tl.maximum(values, -FP8_MAX), FP8_MAX)
            tl.store(q + row * cols + start + offsets, values.to(q.dtype.element_ty), mask=inside)


NORM_MAX_COLS = 16384  # the widest row rmsnorm_quantize takes (held in registers whole)
# Gate and up rows both held in registers up to Llama-3.1-8B's 14,336 (in 16 warps: 64 values a thread); wider
# ones go in two passes of 4,096-value blocks. Lease Q: the two passes at 512 x 14,336 took 30 us, twice the
# separate quantization's 16 (one program a row: too little in flight).
_SILU_ONE_BLOCK_MAX = 16384


def rmsnorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of RMSNorm(x (+ residual)) * weight, quantized per token: x [T, H] (H <= NORM_MAX_COLS, unit stride).
    With a residual, residual becomes x + residual in place (the layer's next residual), as flashinfer's
    fused_add_rmsnorm leaves it. out_dtype float32: the values before the cast (CPU tests)."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] <= NORM_MAX_COLS, (x.shape, x.stride())
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=out_dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        _norm_quantize_rows[(rows,)](
            x,
            residual if residual is not None else x,  # not read without HAS_RESIDUAL
            weight,
            q,
            scale,
            cols,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            FP8_MAX=FP8_MAX,
            BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return q, scale


def silu_mul_quantize(
    gate_up: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of SiLU(gate) * up over gate_up [T, 2 * I] (gate first, unit stride), quantized per token."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1, (gate_up.shape, gate_up.stride())
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    q = torch.empty(rows, cols, dtype=out_dtype, device=gate_up.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device)
    if rows:
        one_block = cols <= _SILU_ONE_BLOCK_MAX
        block = triton.next_power_of_2(cols) if one_block else 4096
        _silu_mul_quantize_rows[(rows,)](
            gate_up,
            q,
            scale,
            cols,
            gate_up.stride(0),
            FP8_MAX=FP8_MAX,
            BLOCK=block,
            ONE_BLOCK=one_block,
            num_warps=16 if block >= 16384 else 8 if block >= 4096 else 4,
        )
    return q, scale
