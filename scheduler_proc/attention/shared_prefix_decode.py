"""Decode attention for groups of sequences whose first KV slots are the same slots ("cascade" decoding): the
radix cache hands every request that starts with a cached prefix that prefix's slots, so in the `prefix`
workload 16 requests decode over one copy of 1,024 shared tokens, and triton_decode.py reads that copy 16
times a layer.

Three kernels. The prefix part, one program per (group, KV head, split): all of the group's query rows (its
members x the KV head's query heads) against the split's slice of the shared slots, so each shared K and V
row is read once for the group. Each sequence's own slots after the prefix: triton_decode's first kernel, one
program per (sequence, KV head, split), started at the sequence's start. Both write normalised partial
outputs and their log-sum-exp side by side; triton_decode's merge weighs them into the output.

A candidate, not yet run by the engine: `scripts/bench_triton_decode.py --heads 14 --kv-heads 2 --head-dim 64
--cascade` times it against triton_decode at the `prefix` workload's shapes on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from scheduler_proc.attention.triton_decode import (
    _split_kv,
    attend_slice,
    default_splits,
    merge_splits,
    store_partial,
)


@triton.jit
def _prefix_part(
    q,
    k_pool,
    v_pool,
    slot_table,
    req_rows,
    group_ptr,
    starts,
    max_prefix,
    partial,
    lse,
    q_stride_b,
    q_stride_h,
    pool_stride_s,
    pool_stride_h,
    table_stride,
    scale,
    v_scale,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    TOTAL_SPLITS: tl.constexpr,
):
    grp = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(group_ptr + grp).to(tl.int64)
    count = tl.load(group_ptr + grp + 1).to(tl.int64) - first
    length = tl.load(starts + first).to(tl.int32)  # every member's shared length
    chunk = tl.cdiv(tl.cdiv(tl.load(max_prefix).to(tl.int32), SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    r = tl.arange(0, ROWS)  # query row r: member r // GROUP, its head r % GROUP of this KV head's
    valid = r < count * GROUP
    b = first + r // GROUP
    heads = h * GROUP + r % GROUP
    d = tl.arange(0, D)
    rows = q + b[:, None] * q_stride_b + heads[:, None] * q_stride_h + d[None, :]
    q_rows = tl.load(rows, mask=valid[:, None], other=0.0)
    slots = slot_table + tl.load(req_rows + first).to(tl.int64) * table_stride  # the first member's row
    kv_rows = k_pool, v_pool, pool_stride_s, h * pool_stride_h
    m_i, l_i, acc = attend_slice(q_rows, kv_rows, slots, lo, hi, scale, ROWS, D, BLOCK_N, False)
    at = (b * (GROUP * tl.num_programs(1)) + heads) * TOTAL_SPLITS + split
    store_partial(m_i, l_i, acc, partial, lse, at, valid, v_scale, D)


def shared_prefix_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    group_ptr: torch.Tensor,
    starts: torch.Tensor,
    max_members: int,
    sm_scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_prefix: Optional[torch.Tensor] = None,
    max_suffix: Optional[torch.Tensor] = None,
    prefix_splits: Optional[int] = None,
    suffix_splits: int = 1,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query token per sequence, q [B, Hq, D], against the KV pool [slots, Hkv, D] at each
    sequence's slots slot_table[req_rows[b], : seq_lens[b]], as triton_decode.decode_attention computes it,
    for a batch in groups: group g is the sequences group_ptr[g] to group_ptr[g + 1] - 1 (at most
    max_members of them), whose first starts[b] slots are the same slots, starts[b] equal within a group and
    less than each seq_lens[b] (a sequence alone: a group of one, its start 0). max_prefix, max_suffix:
    one-element tensors of at least the longest starts and seq_lens - starts (default: computed).
    prefix_splits, suffix_splits: slices of the longest prefix and tail worked on apart (default_splits)."""
    batch, num_q_heads, dim = q.shape
    num_kv_heads, num_groups = k_pool.shape[1], group_ptr.shape[0] - 1
    group = num_q_heads // num_kv_heads
    assert q.stride(2) == 1 and k_pool.stride(2) == 1 and k_pool.stride() == v_pool.stride()
    assert slot_table.stride(1) == 1 and max_members >= 1
    out = torch.empty_like(q)
    if batch == 0:
        return out
    prefix_splits = prefix_splits or default_splits(num_groups * num_kv_heads)
    max_prefix = starts.amax(0, keepdim=True) if max_prefix is None else max_prefix
    max_suffix = (seq_lens - starts).amax(0, keepdim=True) if max_suffix is None else max_suffix
    total = triton.next_power_of_2(prefix_splits + suffix_splits)  # the merge reads a power of two of them
    make = torch.zeros if total > prefix_splits + suffix_splits else torch.empty  # splits past both: zero weight
    partial = make(batch * num_q_heads * total, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch * num_q_heads * total,), -float("inf"), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_pool.stride()[:2], slot_table.stride(0))
    scales = (sm_scale * k_scale, v_scale)
    tiling = dict(D=dim, BLOCK_N=block_n, TOTAL_SPLITS=total, num_warps=num_warps, num_stages=num_stages)
    prefix_args = (q, k_pool, v_pool, slot_table, req_rows, group_ptr, starts, max_prefix, partial, lse)
    rows = max(16, triton.next_power_of_2(max_members * group))
    _prefix_part[(num_groups, num_kv_heads, prefix_splits)](
        *prefix_args, *strides[:2], *strides[4:], *scales, GROUP=group, ROWS=rows, SPLITS=prefix_splits, **tiling
    )
    # Each sequence's own slots: triton_decode's first kernel from its start, into the splits after the prefix's.
    own = (q, k_pool, v_pool, slot_table, req_rows, seq_lens, max_suffix, out, starts, partial, lse, out)
    shape = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLITS=suffix_splits)
    variant = dict(F16_DOTS=k_pool.dtype == torch.float8_e4m3fn, ORDERED=False, FROM_STARTS=True, KV_FIRST=False)
    _split_kv[(num_kv_heads, batch, suffix_splits)](
        *own, *strides, *scales, **shape, **variant, FP8_PRODUCTS=0, FIRST_SPLIT=prefix_splits, **tiling
    )
    merge_splits[(batch, num_q_heads)](partial, lse, out, out.stride(0), out.stride(1), D=dim, SPLITS=total)
    return out
