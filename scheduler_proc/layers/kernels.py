"""Fast library kernels where they apply, None otherwise (the layers fall back to plain torch):
flashinfer's fused kernels on CUDA, and oneDNN's matmul over a pre-packed weight on CPU."""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@functools.cache
def _flashinfer() -> Optional[ModuleType]:
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


# Head sizes flashinfer's attention and RoPE kernels are built for; others (tiny test models) run in torch.
FLASHINFER_HEAD_DIMS = (64, 128, 256, 512)


def flashinfer_for(x: torch.Tensor) -> Optional[ModuleType]:
    """flashinfer if it can run on this tensor (CUDA, half precision), else None."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    return _flashinfer()


class LinearKernel:
    """A drop-in for F.linear(x, weight, bias), one per layer: on CPU in float32 it runs oneDNN's
    matmul over a copy of the weight reordered once into oneDNN's blocked layout.

    torch's CPU F.linear goes to MKL's sgemm, which at decode shapes (a few rows against a large
    weight) ran at about half of oneDNN's packed speed on our AMD machines, and is less
    batch-invariant. The packed copy is remade when the weight gets new storage or is written in
    place through the parameter itself (writes through `.data` are not seen: load before the first
    forward, as the loader does, or call forget() after, as a weight update does).
    """

    def __init__(self) -> None:
        self._packed: Optional[torch.Tensor] = None
        self._key: Optional[tuple[int, int]] = None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not _packed_cpu_applies(x, weight):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if key != self._key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self._key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def forget(self) -> None:
        """Drop the packed copy: the weight was rewritten through `.data` (a weight update)."""
        self._packed, self._key = None, None


def _packed_cpu_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 on CPU, no autograd needed (oneDNN's op has none), and oneDNN built in."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
    )
