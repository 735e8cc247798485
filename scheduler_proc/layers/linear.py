"""Linear layers split over the tensor-parallel ranks (Megatron): a column-parallel layer keeps a slice
of the output features, so its input is whole and its output sharded; a row-parallel layer keeps the
matching slice of the input features and sums its partial products with one all-reduce. Both multiply
through kernels.LinearKernel (oneDNN on a packed weight on CPU, F.linear elsewhere), or, turned FP8
(layers/fp8_linear.py), through an e4m3 weight and its scales.

Weights load from "sources": a checkpoint tensor not read yet (a safetensors slice) or an in-memory
tensor. Each rank indexes only its own rows or columns, so no rank reads the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from scheduler_proc.layers.fp8_linear import SCALE_KINDS, STATIC_INPUT_SCALE, Fp8Format, load_scale, write_weight
from scheduler_proc.layers.kernels import LinearKernel
from scheduler_proc.tp.group import TPGroup


def source_shape(source: Any) -> list[int]:
    """Full shape of a checkpoint tensor: a safetensors slice or a torch tensor."""
    return list(source.get_shape()) if hasattr(source, "get_shape") else list(source.shape)


def read_block(
    source: Any, name: str, expected: list[int], dim: int = 0, start: int = 0, end: Optional[int] = None
) -> torch.Tensor:
    """source[start:end] along dim (all of it when end is None), after checking its shape: every dim
    but `dim` must be as expected, and `dim` must hold [start, end)."""
    shape = source_shape(source)
    end = expected[dim] if end is None else end
    if len(shape) != len(expected) or any(s != e for i, (s, e) in enumerate(zip(shape, expected)) if i != dim):
        raise ValueError(f"checkpoint tensor {name} has shape {shape}, expected {expected}")
    if shape[dim] < end:
        raise ValueError(
            f"checkpoint tensor {name} has {shape[dim]} entries along dim {dim}; this rank "
            f"reads [{start}, {end}) of the {expected[dim]} expected"
        )
    if dim == 0:
        return source[start:end]
    return source[:, start:end]


def load_whole(param: torch.Tensor, source: Any, name: str) -> None:
    """A replicated weight: every rank loads all of it."""
    param.data.copy_(read_block(source, name, list(param.shape)))


@dataclass(frozen=True)
class Part:
    """One projection of a fused column-parallel layer: `size` output features in the checkpoint,
    cut into `num_shards` equal blocks of which this rank keeps block `shard`."""

    name: str  # the checkpoint's name for it (q_proj, gate_proj, ...)
    size: int
    num_shards: int
    shard: int

    @property
    def local_size(self) -> int:
        return self.size // self.num_shards


class ColumnParallelLinear(nn.Linear):
    """Several projections of one input in one matmul ([q|k|v], [gate|up]); each rank holds its block
    of every part, side by side, so the output splits into the parts' local blocks."""

    def __init__(self, in_features: int, parts: list[Part], bias: bool) -> None:
        super().__init__(in_features, sum(p.local_size for p in parts), bias=bias)
        self.parts = parts
        self.offsets = [sum(p.local_size for p in parts[:i]) for i in range(len(parts) + 1)]
        self.matmul = LinearKernel()
        self.fp8: Optional[Fp8Format] = None  # set by fp8_linear.to_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)

    def load_part(self, index: int, kind: str, source: Any, name: str) -> list[str]:
        """This rank's block of part `index` from its checkpoint tensor; returns the parameters written."""
        part = self.parts[index]
        start = part.shard * part.local_size
        return self._load_rows(kind, source, name, index, part.size, start)

    def load_fused(self, kind: str, source: Any, name: str) -> list[str]:
        """A checkpoint that stores the parts as one tensor, side by side in order (Phi-3's qkv_proj and
        gate_up_proj): this rank's block of each part."""
        total = sum(p.size for p in self.parts)
        if kind in SCALE_KINDS and math.prod(source_shape(source)) == 1:  # one scale for every part
            return [n for i in range(len(self.parts)) for n in self._load_rows(kind, source, name, i, total, 0)]
        written, part_start = [], 0
        for index, part in enumerate(self.parts):
            start = part_start + part.shard * part.local_size
            written += self._load_rows(kind, source, name, index, total, start)
            part_start += part.size
        return written

    def _load_rows(self, kind: str, source: Any, name: str, index: int, total: int, start: int) -> list[str]:
        """Rows [start, start + local size) of a checkpoint tensor with `total` rows into part `index`."""
        rows = slice(self.offsets[index], self.offsets[index + 1])
        source_rows = slice(start, start + self.parts[index].local_size)
        if kind in SCALE_KINDS:
            full = [total, self.in_features]
            return load_scale(self, rows, source, name, source_rows, slice(0, self.in_features), full)
        if kind == STATIC_INPUT_SCALE:
            return []
        expected = [total, self.in_features] if kind == "weight" else [total]
        block = read_block(source, name, expected, 0, source_rows.start, source_rows.stop)
        if kind == "weight":
            return write_weight(self, rows, block, name)
        self.bias.data[rows].copy_(block)
        return ["bias"]

    def checkpoint_shapes(self, name: str) -> dict[str, list[int]]:
        """Full checkpoint shapes of this layer's tensors, this module being called `name`; the
        checkpoint names its parts beside it (self_attn.qkv_proj holds self_attn.q_proj ...)."""
        parent = name.rsplit(".", 1)[0]
        shapes = {}
        for part in self.parts:
            shapes[f"{parent}.{part.name}.weight"] = [part.size, self.in_features]
            if self.bias is not None:
                shapes[f"{parent}.{part.name}.bias"] = [part.size]
        return shapes


class RowParallelLinear(nn.Linear):
    """Holds input features [rank * in/tp, (rank + 1) * in/tp); the ranks' partial outputs are summed
    by one all-reduce, then the (replicated) bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp
        self.full_in_features = in_features
        self.matmul = LinearKernel()
        self.fp8: Optional[Fp8Format] = None  # set by fp8_linear.to_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x, self.weight))
        return out + self.bias if self.bias is not None else out

    def load(self, kind: str, source: Any, name: str) -> list[str]:
        """This rank's columns of the weight (and its scale), or the whole bias; returns what was written."""
        if kind == "bias":
            load_whole(self.bias, source, name)
            return ["bias"]
        if kind == STATIC_INPUT_SCALE:
            return []
        rows, full = slice(0, self.out_features), [self.out_features, self.full_in_features]
        cols = slice(self.tp.rank * self.in_features, (self.tp.rank + 1) * self.in_features)
        if kind in SCALE_KINDS:
            return load_scale(self, rows, source, name, rows, cols, full)
        return write_weight(self, rows, read_block(source, name, full, 1, cols.start, cols.stop), name)

    def checkpoint_shapes(self, name: str) -> dict[str, list[int]]:
        shapes = {f"{name}.weight": [self.out_features, self.full_in_features]}
        if self.bias is not None:
            shapes[f"{name}.bias"] = [self.out_features]
        return shapes
