"""Writing a step's new keys and values into the KV pool: one GPU kernel (Triton) for both.

`k_buf[loc] = k; v_buf[loc] = v` is two indexing kernels a layer, each a few microseconds at decode sizes,
where the whole layer's other small kernels take about as long; one kernel copies both. k and v may be
strided views of the q|k|v projection (rows apart, each row's heads contiguous), as the layers give them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_rows(k, v, k_buf, v_buf, loc, k_stride, v_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(loc + token).to(tl.int64)  # slot * ROW passes 2**31 in large pools
    for start in tl.static_range(0, ROW, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < ROW
        tl.store(k_buf + slot * ROW + offsets, tl.load(k + token * k_stride + offsets, mask=inside), mask=inside)
        tl.store(v_buf + slot * ROW + offsets, tl.load(v + token * v_stride + offsets, mask=inside), mask=inside)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor) -> None:
    """k_buf[loc] = k and v_buf[loc] = v, for k, v [T, Hkv, D] and buffers [slots, Hkv, D]; in one kernel
    when each row of k and v is contiguous and the buffers are (else by indexing)."""
    row = k_buf.shape[1] * k_buf.shape[2]
    rows_contiguous = k.stride(1) == v.stride(1) == k.shape[2] and k.stride(2) == v.stride(2) == 1
    if not (rows_contiguous and k_buf.is_contiguous() and v_buf.is_contiguous()):
        k_buf[loc], v_buf[loc] = k, v
    elif k.shape[0]:
        block = min(triton.next_power_of_2(row), 2048)
        _store_rows[(k.shape[0],)](k, v, k_buf, v_buf, loc, k.stride(0), v.stride(0), ROW=row, BLOCK=block)
