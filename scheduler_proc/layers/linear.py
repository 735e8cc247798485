"""Linear layers: plain, and with a weight of several HF weights stacked (q|k|v, gate|up), loaded
shard by shard. Both multiply through kernels.LinearKernel (oneDNN on a packed weight on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from scheduler_proc.layers.kernels import LinearKernel


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.matmul = LinearKernel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One matmul for several projections of the same input; `load_shard` fills one part."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]

    def load_shard(self, index: int, name: str, tensor: torch.Tensor) -> None:
        start, end = self.offsets[index], self.offsets[index + 1]
        target = self.weight if name == "weight" else self.bias
        assert tensor.shape[0] == end - start, (name, tensor.shape, end - start)
        target.data[start:end].copy_(tensor)
