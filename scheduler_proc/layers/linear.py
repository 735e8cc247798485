"""Linear layers split over the tensor-parallel ranks (Megatron): a column-parallel layer keeps a slice
of the output features, so its input is whole and its output sharded; a row-parallel layer keeps the
matching slice of the input features and sums its partial products with one all-reduce. Both multiply
through kernels.LinearKernel (oneDNN on a packed weight on CPU, F.linear elsewhere).

Weights load from "sources": a checkpoint tensor not read yet (a safetensors slice) or an in-memory
tensor. Each rank indexes only its own rows or columns, so no rank reads the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)

    def load_part(self, index: int, kind: str, source: Any, name: str) -> None:
        part = self.parts[index]
        start = part.shard * part.local_size
        expected = [part.size, self.in_features] if kind == "weight" else [part.size]
        block = read_block(source, name, expected, 0, start, start + part.local_size)
        target = self.weight if kind == "weight" else self.bias
        target.data[self.offsets[index] : self.offsets[index + 1]].copy_(block)

    def load_fused(self, kind: str, source: Any, name: str) -> None:
        """A checkpoint that stores the parts as one tensor, side by side in order (Phi-3's qkv_proj and
        gate_up_proj): this rank's block of each part."""
        total = sum(p.size for p in self.parts)
        expected = [total, self.in_features] if kind == "weight" else [total]
        target = self.weight if kind == "weight" else self.bias
        part_start = 0
        for index, part in enumerate(self.parts):
            start = part_start + part.shard * part.local_size
            block = read_block(source, name, expected, 0, start, start + part.local_size)
            target.data[self.offsets[index] : self.offsets[index + 1]].copy_(block)
            part_start += part.size

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x, self.weight))
        return out + self.bias if self.bias is not None else out

    def load(self, kind: str, source: Any, name: str) -> None:
        if kind == "bias":
            load_whole(self.bias, source, name)
            return
        start = self.tp.rank * self.in_features
        block = read_block(source, name, [self.out_features, self.full_in_features], 1, start, start + self.in_features)
        self.weight.data.copy_(block)

    def checkpoint_shapes(self, name: str) -> dict[str, list[int]]:
        shapes = {f"{name}.weight": [self.out_features, self.full_in_features]}
        if self.bias is not None:
            shapes[f"{name}.bias"] = [self.out_features]
        return shapes
