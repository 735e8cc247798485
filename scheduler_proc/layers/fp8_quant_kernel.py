"""Per-token FP8 quantization of activations in one GPU kernel (Triton): each program takes one row, finds
its absolute maximum, and writes the row over its scale in e4m3 and the float32 scale. A row of up to
16,384 values (every hidden and intermediate size of our models) is read once and held in registers;
a longer one is read twice, in blocks.

In torch the same is about eight kernels (abs, amax, casts, divisions, clamps); ahead of each of a layer's
four FP8 matmuls, in every decode step, those launches would cost a large part of what FP8 saves.
Divisions round to nearest (div_rn), as torch's do, so the scales and the values before the final cast
equal torch's; the cast is the device's round-to-nearest-even, as torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0


_ONE_BLOCK_MAX = 16384  # the longest row held in registers whole (16 values a thread over 8 warps at 4,096)


@triton.jit
def _quantize_rows(x, q, scale, cols, x_stride, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # one read: the row stays in registers between its maximum and its scaling
        inside = offsets < cols
        values = tl.load(x + row * x_stride + offsets, mask=inside, other=0.0).to(tl.float32)
        row_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(values), 0), 1e-12), FP8_MAX)
        tl.store(scale + row, row_scale)
        values = tl.minimum(tl.maximum(tl.math.div_rn(values, row_scale), -FP8_MAX), FP8_MAX)
        tl.store(q + row * cols + offsets, values.to(q.dtype.element_ty), mask=inside)
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
