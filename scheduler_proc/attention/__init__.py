"""Attention backends behind one small interface; `create_backend` picks one by name."""

from __future__ import annotations

import logging
from typing import Optional

from scheduler_proc.attention.base import AttentionBackend, LayerAttention
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.layers.kernels import FLASHINFER_HEAD_DIMS

logger = logging.getLogger(__name__)


def create_backend(
    name: str,
    pool: KVPool,
    device: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    layers: Optional[list[LayerAttention]] = None,
    decode: Optional[str] = None,
) -> AttentionBackend:
    """name: "torch", "flashinfer" or "auto" (flashinfer on CUDA when installed, else torch); layers:
    each layer's window, scale and soft cap (None: plain causal attention everywhere); decode: "triton"
    runs flashinfer's decode steps on triton_decode.py's kernel, "flashinfer" on flashinfer's, None on
    Triton's wherever its kernel applies (no window, no soft cap)."""
    triton_decode = decodes_on_triton(decode, layers)
    if name == "flashinfer" and head_dim not in FLASHINFER_HEAD_DIMS:
        raise ValueError(f"attention_backend='flashinfer' supports head_dim {FLASHINFER_HEAD_DIMS}, not {head_dim}")
    if name == "auto" and device == "cuda" and head_dim not in FLASHINFER_HEAD_DIMS:
        logger.warning("head_dim %d: flashinfer has no kernels for it; using the torch attention backend", head_dim)
    elif name in ("auto", "flashinfer") and device == "cuda":
        try:
            from scheduler_proc.attention.flashinfer_backend import FlashInferBackend
        except ImportError as exc:
            if name == "flashinfer":
                raise
            logger.warning("flashinfer is not installed (%s); using the torch SDPA attention backend", exc)
        else:
            return FlashInferBackend(pool, num_heads, num_kv_heads, head_dim, layers, triton_decode)
    elif name == "flashinfer":
        raise ValueError("attention_backend='flashinfer' needs device='cuda'")
    if decode == "triton":
        raise ValueError("decode_attention_backend='triton' needs the flashinfer attention backend on the GPU")
    from scheduler_proc.attention.torch_backend import TorchBackend

    return TorchBackend(pool, layers)


def decodes_on_triton(decode: Optional[str], layers: Optional[list[LayerAttention]]) -> bool:
    """Whether a flashinfer backend runs decode steps on triton_decode.py's kernel: when asked ("triton"),
    or by default (None) where the kernel applies, layers without a sliding window or soft cap."""
    plain = all(layer.window is None and layer.softcap is None for layer in layers or [])
    if decode == "triton" and not plain:
        raise ValueError("decode_attention_backend='triton' has no sliding window or soft cap (this model's layers do)")
    # The default because on an H200 (lease K) it ran Qwen2.5-0.5B 1.29-1.60x and Qwen3-0.6B 0.99-1.08x as
    # fast as flashinfer's decode, which plans every step on the host (docs/benchmarks.md).
    return decode == "triton" or (decode is None and plain)
