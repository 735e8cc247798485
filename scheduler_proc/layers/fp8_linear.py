"""FP8 weights inside the linear layers (layers/linear.py): a layer turned FP8 keeps `weight` as e4m3
[out, in] and `weight_scale` in float32, one per output row ([out]) or one per block of the checkpoint's
`weight_block_size` ([ceil(out/bn), ceil(in/bk)]); it multiplies through Fp8Kernel.

A layer's weight arrives in slices, as the loader reads this rank's rows (column-parallel) or columns
(row-parallel). An FP8 slice is copied as it is and its scale arrives separately (`weight_scale` or
`weight_scale_inv`, sharded the same way: per-tensor scales become per-row ones, block scales keep the
blocks this rank's slice covers). A high-precision slice (a bf16 checkpoint under quantization="fp8",
random weights, or a trainer's weight update) is quantized as it is written: per row, or per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.fp8 import (
    FP8,
    Fp8Rows,
    dequantize,
    fp8_matmul_supported,
    quantize_blockwise,
    quantize_per_channel,
    scaled_mm,
)
from scheduler_proc.layers.kernels import LinearKernel

SCALE_KINDS = ("weight_scale", "weight_scale_inv")  # checkpoint names of a weight's scale (per-tensor/row, block)
STATIC_INPUT_SCALE = "input_scale"  # a static activation scale; ferry quantizes activations per token instead


@dataclass(frozen=True)
class Fp8Format:
    """How an FP8 layer's scale is laid out: per output row (block None) or per (rows, cols) block."""

    block: Optional[tuple[int, int]] = None


class Fp8Kernel:
    """The matmul of an FP8 layer, in the place of its LinearKernel: FP8 tensor cores where the device
    has them (per-row weight scales, per-token activation scales), else the weight dequantized to the
    input's dtype (on CPU made once and kept, as LinearKernel keeps its packed copy)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer  # a plain attribute: the kernel is not a module, so no cycle is registered
        self.inner = LinearKernel()
        self._dequantized: Optional[torch.Tensor] = None

    def __call__(
        self, x: torch.Tensor | Fp8Rows, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        scale, block = self.layer.weight_scale, self.layer.fp8.block
        if isinstance(x, Fp8Rows):  # quantized by the kernel before, where takes_fp8_rows() said so
            return scaled_mm(x, weight, scale, bias)
        # bf16 only: row-wise scaled FP8 GEMMs give fp16 outputs only in newer torch builds.
        if block is None and x.dtype == torch.bfloat16 and fp8_matmul_supported(x.device):
            return scaled_mm(x, weight, scale, bias)
        if x.device.type == "cpu":
            if self._dequantized is None:
                self._dequantized = dequantize(weight, scale, x.dtype, block)
            return self.inner(x, self._dequantized, bias)
        return F.linear(x, dequantize(weight, scale, x.dtype, block), bias)

    def forget(self) -> None:
        """Drop the dequantized copy: the weight or its scale was rewritten."""
        self._dequantized = None
        self.inner.forget()


def takes_fp8_rows(layer: nn.Module) -> bool:
    """The layer multiplies on FP8 tensor cores (a per-row scaled FP8 weight, in a bf16 model on a device that
    has them), so the kernel making its input may hand it quantized rows (fp8.Fp8Rows) instead. Call after
    finish_loading."""
    return getattr(layer, "fp8_matmuls", False)


def to_fp8(layer: nn.Module, block: Optional[tuple[int, int]]) -> None:
    """Give a linear layer (on the meta device, before it is materialised) an e4m3 weight and a float32
    scale; the loader fills both."""
    rows, cols = layer.weight.shape
    device = layer.weight.device
    layer.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8, device=device), requires_grad=False)
    scale_shape = [rows] if block is None else [math.ceil(rows / block[0]), math.ceil(cols / block[1])]
    layer.weight_scale = nn.Parameter(torch.ones(scale_shape, device=device), requires_grad=False)
    layer.fp8 = Fp8Format(block)
    layer.matmul = Fp8Kernel(layer)


def finish_loading(layer: nn.Module, dtype: torch.dtype) -> None:
    """Where Fp8Kernel will use FP8 matmuls (a bf16 model on a device that has them), re-quantize a
    block-scaled weight per output row, the scaling torch._scaled_mm takes (its rounding error is that
    of one more FP8 quantization)."""
    layer.fp8_matmuls = dtype == torch.bfloat16 and fp8_matmul_supported(layer.weight.device)
    block = layer.fp8.block
    if block is None or not layer.fp8_matmuls:
        return
    q, scale = quantize_per_channel(dequantize(layer.weight, layer.weight_scale, torch.float32, block))
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    layer.fp8 = Fp8Format(None)
    layer.matmul.forget()


def write_weight(layer: nn.Module, rows: slice, tensor: torch.Tensor, name: str) -> list[str]:
    """layer.weight[rows] = tensor (all of the layer's columns); returns the parameters written."""
    if layer.fp8 is None:
        if tensor.dtype == FP8:
            raise ValueError(f"checkpoint tensor {name} is FP8, but its layer is not (quantization_config?)")
        layer.weight.data[rows].copy_(tensor)
        return ["weight"]
    if tensor.dtype == FP8:
        layer.weight.data[rows].copy_(tensor)
        layer.matmul.forget()
        return ["weight"]
    block = layer.fp8.block
    tensor = tensor.to(layer.weight.device)  # quantized where the layer lives (a GPU, not the host)
    if block is None:
        q, scale = quantize_per_channel(tensor)
        layer.weight_scale.data[rows].copy_(scale)
    else:
        scale_rows = _block_rows(rows, block[0], layer.weight.shape[0], name)
        q, scale = quantize_blockwise(tensor, block)
        layer.weight_scale.data[scale_rows].copy_(scale)
    layer.weight.data[rows].copy_(q)
    layer.matmul.forget()
    return ["weight", "weight_scale"]


def load_scale(
    layer: nn.Module, rows: slice, source: Any, name: str, source_rows: slice, source_cols: slice, full: list[int]
) -> list[str]:
    """Fill layer.weight_scale for weight rows `rows` from the checkpoint scale of the weight whose full
    shape is `full`, of which this layer holds rows `source_rows` and columns `source_cols`."""
    if layer.fp8 is None:
        raise ValueError(f"checkpoint tensor {name} scales an FP8 weight, but its layer is not FP8")
    shape = list(source.get_shape()) if hasattr(source, "get_shape") else list(source.shape)
    target = layer.weight_scale.data
    block = layer.fp8.block
    if math.prod(shape) == 1 and block is None:  # per tensor: the same number on each of its rows
        target[rows] = source[...].reshape(()).float()
    elif block is None and math.prod(shape) == full[0]:  # per output row: [N] or [N, 1]
        values = source[source_rows.start : source_rows.stop].float()
        target[rows] = values.reshape(-1)
    elif block is not None and shape == [math.ceil(full[0] / block[0]), math.ceil(full[1] / block[1])]:
        src_rows = _block_rows(source_rows, block[0], full[0], name)
        src_cols = _block_rows(source_cols, block[1], full[1], name)
        values = source[src_rows.start : src_rows.stop].float()[:, src_cols]
        target[_block_rows(rows, block[0], layer.weight.shape[0], name)] = values
    else:
        how = f"blocks of {list(block)}" if block else "one per tensor or per output row"
        raise ValueError(f"checkpoint tensor {name} has shape {shape}; for a weight {full} expected {how}")
    layer.matmul.forget()
    return ["weight_scale"]


def _block_rows(rows: slice, size: int, total: int, name: str) -> slice:
    """The block indices covering rows [start, stop): the slice must start on a block edge and end on one
    (or at the tensor's end, where the last block is ragged)."""
    if rows.start % size or (rows.stop % size and rows.stop != total):
        raise ValueError(
            f"{name}: rows/columns [{rows.start}, {rows.stop}) of {total} do not fall on FP8 blocks of {size} "
            "(tensor parallelism must split a block-scaled weight at block edges)"
        )
    return slice(rows.start // size, math.ceil(rows.stop / size))
