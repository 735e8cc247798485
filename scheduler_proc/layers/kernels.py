"""flashinfer's fused kernels when installed and on CUDA; None otherwise (the layers fall back to torch)."""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)


@functools.cache
def _flashinfer() -> Optional[ModuleType]:
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def flashinfer_for(x: torch.Tensor) -> Optional[ModuleType]:
    """flashinfer if it can run on this tensor (CUDA, half precision), else None."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    return _flashinfer()
