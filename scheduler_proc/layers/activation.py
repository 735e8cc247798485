"""act(gate) * up over a fused [gate | up] projection: SiLU (most models) or tanh-approximated GELU (Gemma).
SiLU's may also quantize its output per token for an FP8 down projection (out_fp8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.fp8 import Fp8Rows
from scheduler_proc.layers.kernels import flashinfer_for


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Set by the model once its weights are loaded, where the down projection is FP8 and takes quantized
        # rows (fp8_linear.takes_fp8_rows): then a bf16 output on CUDA comes as fp8.Fp8Rows.
        self.out_fp8 = False

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor | Fp8Rows:
        if self.out_fp8 and gate_up.is_cuda and gate_up.dim() == 2 and gate_up.dtype == torch.bfloat16:
            from scheduler_proc.layers.fp8_quant_kernel import silu_mul_quantize  # triton: GPU only

            return Fp8Rows(*silu_mul_quantize(gate_up), gate_up.dtype)
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
