"""RMSNorm, optionally fused with the residual add that precedes it, and with the per-token FP8 quantization
of its output where an FP8 matmul reads it (out_fp8)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from scheduler_proc.layers.fp8 import Fp8Rows
from scheduler_proc.layers.kernels import flashinfer_for


class RMSNorm(nn.Module):
    # flashinfer's kernels for this norm: plain, and fused with the residual add; whether the plain one
    # takes [rows, D] only (rmsnorm also takes the [T, H, D] heads of a per-head q/k norm)
    fi_norm, fi_fused_add = "rmsnorm", "fused_add_rmsnorm"
    fi_rows_only = False

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        # Set by the model once its weights are loaded, where the only reader is an FP8 projection that takes
        # quantized rows (fp8_linear.takes_fp8_rows): then a bf16 output on CUDA comes as fp8.Fp8Rows.
        self.out_fp8 = False

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Fp8Rows, tuple[torch.Tensor | Fp8Rows, torch.Tensor]]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if self.out_fp8 and x.is_cuda and x.dim() == 2 and x.dtype == torch.bfloat16:
            from scheduler_proc.layers.fp8_quant_kernel import NORM_MAX_COLS, rmsnorm_quantize  # triton: GPU only

            if x.shape[1] <= NORM_MAX_COLS:
                out = Fp8Rows(*rmsnorm_quantize(x, self.weight, self.eps, residual), x.dtype)
                return out if residual is None else (out, residual)
        fi = flashinfer_for(x)
        if fi is not None and x.dim() == 2:
            if residual is None:
                return getattr(fi, self.fi_norm)(x, self.weight, self.eps)
            getattr(fi, self.fi_fused_add)(x, residual, self.weight, self.eps)  # in place: x=norm, residual=sum
            return x, residual
        if residual is not None:
            x = x + residual
            residual = x
        out = self._torch_norm(x)
        return out if residual is None else (out, residual)

    def forward_inplace(self, x: torch.Tensor) -> None:
        """x = norm(x) over its last dim, in place; x may be a strided view (per-head q/k norms)."""
        fi = flashinfer_for(x)
        if fi is not None and (x.dim() == 2 or not self.fi_rows_only):
            getattr(fi, self.fi_norm)(x, self.weight, self.eps, out=x)
        elif fi is not None:  # [T, H, D] heads through a kernel that takes rows only
            x.copy_(getattr(fi, self.fi_norm)(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view_as(x))
        else:
            x.copy_(self._torch_norm(x))

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        # As HF transformers: statistics in float32, scale in the input dtype.
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint's weight w scales by (1 + w), and the whole norm runs in float32."""

    fi_norm, fi_fused_add = "gemma_rmsnorm", "gemma_fused_add_rmsnorm"
    fi_rows_only = True

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)
