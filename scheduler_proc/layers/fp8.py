"""FP8 (e4m3) numerics: quantizing weights (per output channel, or in blocks as DeepSeek-V3 and Qwen3-*-FP8
checkpoints are) and activations (per token, or per group of columns), dequantizing, and the matmul of
an FP8 weight with a high-precision input.

Conventions follow the checkpoints: a weight is `q * scale`, where scale is one number (per tensor), one
per output row (per channel) or one per `block` of rows x columns (`weight_scale_inv` in HF's FP8 layout,
which despite its name multiplies). Blocks at the right and bottom edges may be ragged.

The matmul runs on `torch._scaled_mm` (FP8 tensor cores) on CUDA devices of compute capability 8.9 or
more (Ada, Hopper and later), with the input quantized per token at run time. Everywhere else (CPU,
older GPUs) the weight is dequantized to the compute dtype and multiplied as usual: the fallback is a
weight-only FP8 model whose outputs equal those of the model with the dequantized weights.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # floor of an amax, so an all-zero row gets a finite scale


class Fp8Rows(NamedTuple):
    """Activations already quantized per token, as the kernel before an FP8 matmul may write them
    (fp8_quant_kernel.py): q [T, K] e4m3, scale [T, 1] float32, and the dtype they were computed in (the
    matmul's output dtype)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] e4m3, scale [N] float32) with weight ~= q * scale[:, None]: each row's amax maps to 448."""
    scale = weight.abs().amax(dim=1).float().clamp(min=_TINY) / FP8_MAX
    q = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_blockwise(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K] e4m3, scale [ceil(N/bn), ceil(K/bk)] float32): one scale per block, edges ragged."""
    rows, cols = weight.shape
    bn, bk = block
    padded = F.pad(weight.float(), (0, -cols % bk, 0, -rows % bn))
    tiles = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=_TINY) / FP8_MAX
    q = (weight.float() / expand_block_scale(scale, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def expand_block_scale(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """A block scale [ceil(N/bn), ceil(K/bk)] repeated to one entry per weight element [N, K]."""
    return scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: Optional[tuple[int, int]] = None):
    """q * scale in `dtype`: scale is one number, one per row ([N] or [N, 1]), or per block when `block`."""
    rows, cols = q.shape
    if block is not None:
        full = expand_block_scale(scale.float(), block, rows, cols)
    elif scale.numel() == 1:
        full = scale.float().reshape(1, 1)
    else:
        full = scale.float().reshape(rows, 1)
    return (q.float() * full).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, K] e4m3, scale [T, 1] float32): each row of the activations scaled to the FP8 range."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, K] e4m3, scale [T, ceil(K/group)] float32): one scale per token per `group` columns, as the
    activations of a block-scaled layer are quantized (DeepSeek-V3)."""
    tokens, cols = x.shape
    padded = F.pad(x.float(), (0, -cols % group))
    scale = padded.view(tokens, -1, group).abs().amax(dim=-1).clamp(min=_TINY) / FP8_MAX
    full = scale.repeat_interleave(group, dim=1)[:, :cols]
    return (x.float() / full).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def fp8_matmul_supported(device: torch.device) -> bool:
    """torch._scaled_mm runs on this device: CUDA with compute capability 8.9 or more."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(
    x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """x [..., K] (bf16/fp16, or rows already quantized) @ (weight [N, K] e4m3 * weight_scale [N])^T on FP8
    tensor cores: x is quantized per token, and both scales are applied in the matmul's epilogue. The
    matmul is torch._scaled_mm, or the Triton GEMM at the shapes where it measured faster."""
    if isinstance(x, Fp8Rows):
        rows, shape = x, x.q.shape
    else:
        shape = x.shape
        rows = Fp8Rows(*_quantize_activations(x.reshape(-1, shape[-1])), x.dtype)
    m, k = rows.q.shape
    n = weight.shape[0]
    from scheduler_proc.layers.triton_linear import fp8_config, triton_linear

    config = fp8_config(m, n, k)
    if config is not None:
        scales = (rows.scale, weight_scale)
        out = triton_linear(rows.q, weight, bias, config, scales=scales, out_dtype=rows.dtype)
    else:
        out = torch._scaled_mm(
            rows.q,
            weight.t(),  # [K, N] column-major, as cuBLAS wants the second operand
            scale_a=rows.scale,
            scale_b=weight_scale.view(1, -1),
            bias=bias,
            out_dtype=rows.dtype,
        )
    return out.view(*shape[:-1], n)


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_token in one Triton kernel where the row is contiguous, else in torch."""
    if x.stride(-1) != 1:
        return quantize_per_token(x)
    from scheduler_proc.layers.fp8_quant_kernel import quantize_rows

    return quantize_rows(x)
