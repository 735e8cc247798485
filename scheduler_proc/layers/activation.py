"""act(gate) * up over a fused [gate | up] projection: SiLU (most models) or tanh-approximated GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.kernels import flashinfer_for


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        fi = flashinfer_for(gate_up)
        if fi is not None:
            return fi.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """GELU(gate, tanh approximation) * up: HF's `gelu_pytorch_tanh`."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        fi = flashinfer_for(gate_up)
        if fi is not None:
            return fi.gelu_tanh_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
