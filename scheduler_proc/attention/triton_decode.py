"""Decode attention over the token-granular KV pool in two Triton kernels (split-KV "flash decoding"),
run by decode_attention_backend="triton" (flashinfer_backend.py) and timed against flashinfer's decode
kernels by scripts/bench_attention.py.

A sequence's KV slots are read where the pool's request-to-token table holds them (its row, positions 0 to
its length - 1): no per-step index list and no plan, so a decode step's attention needs nothing from the
host but the rows and lengths, which a CUDA graph takes in fixed buffers.

Why a candidate: a Qwen3-0.6B decode step spends 75-77% of its time in flashinfer's decode kernel, which
reads the KV at 3.3-3.6 TB/s of the H200's 4.8; and over an FP8 KV cache flashinfer's tensor-core path is
slower than over bf16 (flashinfer #1753), where an FP8 cache should halve the bytes read.

Stage 1, one program per (sequence, KV head, split): the split's slice of the sequence's slots, read in
blocks of BLOCK_N tokens as whole [BLOCK_N, head_dim] rows of that head (an FP8 row converted in
registers, or multiplied as read: fp8_products), against all of the head's GROUP query heads at once (a
tl.dot of [GROUP_PAD, D] x [D, BLOCK_N]), with an online softmax; it writes its normalised partial output
and log-sum-exp. Stage 2, one program per (sequence, query head): the splits' partial outputs weighted by
their share of the softmax mass. With one split (a large batch fills the SMs by itself) stage 1 writes the
output and stage 2 is not launched: a kernel fewer in each layer of a decode step.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from scheduler_proc.attention.base import LayerAttention
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.kv_pool import KVPool


@triton.jit
def attend_slice(
    q_rows,
    kv_rows,
    slots_of_seq,
    lo,
    hi,
    scale,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_PRODUCTS: tl.constexpr,
):
    """The query rows against the KV of the sequence's slots lo..hi, with an online softmax: (running max,
    running sum, unnormalised output). kv_rows: the pools, the row stride and this KV head's offset.
    FP8_PRODUCTS (an FP8 pool): 1, q_rows in e4m3, the scores' product on FP8 operands (the K block as read),
    the values' in fp16; 2 (attend_slice_kv_first only), the values' too, the softmax weights in e4m3."""
    k_pool, v_pool, pool_stride_s, head_offset = kv_rows
    m_i = tl.full([GROUP_PAD], -float("inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        valid = n0 + n < hi
        slots = tl.load(slots_of_seq + n0 + n, mask=valid, other=0).to(tl.int64)
        rows = slots[:, None] * pool_stride_s + head_offset + d[None, :]
        k = tl.load(k_pool + rows, mask=valid[:, None], other=0.0).to(q_rows.dtype)
        scores = tl.dot(q_rows, tl.trans(k)) * scale  # scale: sm_scale * k_scale
        scores = tl.where(valid[None, :], scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_pool + rows, mask=valid[:, None], other=0.0).to(tl.float16 if FP8_PRODUCTS else q_rows.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def attend_slice_kv_first(
    q_rows,
    kv_rows,
    slots_of_seq,
    lo,
    hi,
    scale,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8_PRODUCTS: tl.constexpr,
):
    """attend_slice with the KV block as the first operand of both products (scores^T = K q^T, out^T =
    V^T p^T), so that on Hopper a block converted in registers (an FP8 pool read in fp16) feeds the tensor
    cores from registers, with 64 or more rows a product, rather than going back to shared memory."""
    k_pool, v_pool, pool_stride_s, head_offset = kv_rows
    m_i = tl.full([GROUP_PAD], -float("inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc_t = tl.zeros([D, GROUP_PAD], tl.float32)
    q_t = tl.trans(q_rows)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        valid = n0 + n < hi
        slots = tl.load(slots_of_seq + n0 + n, mask=valid, other=0).to(tl.int64)
        k = tl.load(k_pool + slots[:, None] * pool_stride_s + head_offset + d[None, :], mask=valid[:, None], other=0.0)
        scores_t = tl.dot(k.to(q_rows.dtype), q_t) * scale  # [BLOCK_N, GROUP_PAD]
        scores_t = tl.where(valid[:, None], scores_t, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores_t, 0))
        p_t = tl.exp(scores_t - m_new[None, :])
        alpha = tl.exp(m_i - m_new)
        v_t = tl.load(
            v_pool + slots[None, :] * pool_stride_s + head_offset + d[:, None], mask=valid[None, :], other=0.0
        )
        if FP8_PRODUCTS == 2:  # weights times 2^8 into e4m3's normal range (down to 2^-14), undone below
            pv = tl.dot(v_t, (p_t * 256.0).to(tl.float8e4nv))
        else:
            pv_type = tl.float16 if FP8_PRODUCTS else q_rows.dtype
            pv = tl.dot(v_t.to(pv_type), p_t.to(pv_type))
        acc_t = acc_t * alpha[None, :] + pv
        l_i = l_i * alpha + tl.sum(p_t, 0)
        m_i = m_new
    return m_i, l_i, tl.trans(acc_t) * (1.0 / 256.0 if FP8_PRODUCTS == 2 else 1.0)


@triton.jit
def attend(
    q_rows,
    kv_rows,
    slots_of_seq,
    lo,
    hi,
    scale,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_FIRST: tl.constexpr,
    FP8_PRODUCTS: tl.constexpr,
):
    """attend_slice, or with KV_FIRST attend_slice_kv_first."""
    if KV_FIRST:
        result = attend_slice_kv_first(
            q_rows, kv_rows, slots_of_seq, lo, hi, scale, GROUP_PAD, D, BLOCK_N, FP8_PRODUCTS
        )
    else:
        result = attend_slice(q_rows, kv_rows, slots_of_seq, lo, hi, scale, GROUP_PAD, D, BLOCK_N, FP8_PRODUCTS)
    return result


@triton.jit
def store_partial(m_i, l_i, acc, partial, lse, at, valid, v_scale, D: tl.constexpr):
    """A split's normalised output and log-sum-exp at rows `at` of the merge's inputs. A split that held no
    slot (past a short sequence's end, or an empty shared prefix) gets weight zero there: lse -inf."""
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None] * v_scale, 0.0)
    tl.store(partial + at[:, None] * D + tl.arange(0, D)[None, :], o, mask=valid[:, None])
    tl.store(lse + at, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), -float("inf")), mask=valid)


@triton.jit
def query_operand(q_rows, scale, F16_DOTS: tl.constexpr, FP8_PRODUCTS: tl.constexpr):
    """The query rows in the scores' product's type, and the scores' scale: over an FP8 pool in fp16 (e4m3
    converts to fp16 in one instruction a pair, to bf16 in several), or with FP8_PRODUCTS in e4m3 (one scale
    for the program's rows, moved into the scores' scale)."""
    if FP8_PRODUCTS:
        q_scale = tl.maximum(tl.max(tl.max(tl.abs(q_rows.to(tl.float32)), 1), 0), 1e-30) / 448.0
        q_rows = (q_rows.to(tl.float32) / q_scale).to(tl.float8e4nv)
        scale = scale * q_scale
    elif F16_DOTS:
        q_rows = tl.minimum(tl.maximum(q_rows.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    return q_rows, scale


# Programs start in the order of their ids, heads fastest: a sequence's heads read neighbouring bytes of the
# same slots together. With ORDERED the sequences are taken longest first (order: indices by descending
# length, equal lengths in batch order), so the last programs to start are the shortest. Every split of the
# batch spans the same number of tokens (whole blocks), sized by the longest sequence: a short sequence has
# fewer splits with work, not shorter ones, so programs take about equal time.
@triton.jit
def _split_kv(
    q,
    k_pool,
    v_pool,
    slot_table,
    req_rows,
    seq_lens,
    max_len,
    order,
    starts,
    partial,
    lse,
    out,
    q_stride_b,
    q_stride_h,
    out_stride_b,
    out_stride_h,
    pool_stride_s,
    pool_stride_h,
    table_stride,
    scale,
    v_scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    F16_DOTS: tl.constexpr,
    ORDERED: tl.constexpr,
    FROM_STARTS: tl.constexpr,
    FIRST_SPLIT: tl.constexpr,
    TOTAL_SPLITS: tl.constexpr,
    KV_FIRST: tl.constexpr,
    FP8_PRODUCTS: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if ORDERED:
        b = tl.load(order + b).to(tl.int64)
    split = tl.program_id(2)
    slots_of_seq = slot_table + tl.load(req_rows + b).to(tl.int64) * table_stride
    length = tl.load(seq_lens + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(tl.load(max_len).to(tl.int32), SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    if FROM_STARTS:  # shared_prefix_decode's own part of each sequence: its slots after the shared ones
        lo += tl.load(starts + b).to(tl.int32)
    hi = tl.minimum(lo + chunk, length)
    g = tl.arange(0, GROUP_PAD)
    valid, heads = g < GROUP, h * GROUP + g  # the group's query heads, GROUP of them in GROUP_PAD rows
    d = tl.arange(0, D)
    q_rows = tl.load(q + b * q_stride_b + heads[:, None] * q_stride_h + d[None, :], mask=valid[:, None], other=0.0)
    q_rows, scale = query_operand(q_rows, scale, F16_DOTS, FP8_PRODUCTS)
    kv_rows = k_pool, v_pool, pool_stride_s, h * pool_stride_h
    m_i, l_i, acc = attend(q_rows, kv_rows, slots_of_seq, lo, hi, scale, GROUP_PAD, D, BLOCK_N, KV_FIRST, FP8_PRODUCTS)
    if TOTAL_SPLITS == 1:  # the whole sequence (at least one token) in this program: its output is final
        rows_out = out + b * out_stride_b + heads[:, None] * out_stride_h + d[None, :]
        tl.store(rows_out, (acc / l_i[:, None] * v_scale).to(out.dtype.element_ty), mask=valid[:, None])
    else:
        at = (b * (GROUP * tl.num_programs(0)) + heads) * TOTAL_SPLITS + FIRST_SPLIT + split
        store_partial(m_i, l_i, acc, partial, lse, at, valid, v_scale, D)


@triton.jit
def merge_splits(partial, lse, out, out_stride_b, out_stride_h, D: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    at = (b * tl.num_programs(1) + head) * SPLITS + s
    weights = tl.load(lse + at)
    weights = tl.exp(weights - tl.max(weights, 0))
    parts = tl.load(partial + at[:, None] * D + d[None, :])
    merged = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out + b * out_stride_b + head * out_stride_h + d, merged.to(out.dtype.element_ty))


def default_splits(work_items: int) -> int:
    """Slices to cut each of `work_items` (sequence, KV head) pairs into: enough programs to fill an H200's
    132 SMs about four times over, a power of two up to 16."""
    return triton.next_power_of_2(max(1, min(16, triton.cdiv(528, max(1, work_items)))))


def _tiling(dim: int, fp8: bool, block_n, num_stages, kv_first, fp8_products) -> tuple[int, int, bool, int]:
    """(block_n, num_stages, kv_first, fp8_products), each as given or by head_dim and KV dtype. H200, in CUDA
    graphs at the engine's KV layout (bench_triton_decode.py): at Qwen2.5-0.5B's heads (7 x 64 a KV head)
    128-token blocks in two buffers took 8-18% less time than 64 in three (lease O); at Qwen3-0.6B's (2 x 128)
    64 in three or two were the fastest (lease L: three 2-24% before two). Over an FP8 pool at Llama-3.1-8B's
    heads (4 x 128), the KV-first products with the scores' on FP8 operands, in three buffers of 128, took 22%
    less than KV-first alone (lease R: 344 against 440 us at 512 x 1,100, 146 against 174 at nanovllm lengths;
    in two buffers of 64, the FP8 scores were slower)."""
    if fp8 and dim == 128:
        default = 128, 3, True, 1
    else:
        default = (128, 2, False, 0) if dim <= 64 else (64, 3, False, 0) if dim <= 128 else (64, 2, False, 0)
    given = block_n, num_stages, kv_first, fp8_products
    block_n, num_stages, kv_first, fp8_products = (d if g is None else g for g, d in zip(given, default))
    assert (fp8 or not fp8_products) and (kv_first or fp8_products < 2), "fp8_products: an FP8 pool; 2: kv_first"
    return block_n, num_stages, kv_first, fp8_products


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_len: Optional[torch.Tensor] = None,
    splits: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: int = 4,
    num_stages: Optional[int] = None,
    fp8_in_f16: bool = True,
    order: Optional[torch.Tensor] = None,
    kv_first: Optional[bool] = None,
    fp8_products: Optional[int] = None,
    group_rows: int = 16,
) -> torch.Tensor:
    """Attention of one query token per sequence: q [B, Hq, D] against the KV pool [slots, Hkv, D] (bf16, or
    FP8 holding value / scale) at each sequence's slots slot_table[req_rows[b], : seq_lens[b]] (the pool's
    req_to_token; seq_lens of at least 1) -> [B, Hq, D] in q's dtype. max_len: a one-element tensor of at
    least the longest of seq_lens (default: their maximum). splits: slices of the longest sequence worked on
    apart, the others cut into slices as long (default: enough programs to fill an H200's 132 SMs about four
    times over); block_n, num_warps, num_stages: the first kernel's tiling (defaults: _tiling's).
    fp8_in_f16: over an FP8 pool, the dot products in fp16 (which holds every e4m3 value exactly, and the
    query clamped to its range) rather than in q's dtype. order: the batch's indices by descending
    seq_lens, to start the longest sequences' programs first (default: batch order; the engine passes a
    stable sort's: Qwen3-0.6B `nanovllm` decode 5% faster on the H200). kv_first: attend_slice_kv_first's
    products; fp8_products: over an FP8 pool, 1: the scores' on e4m3 operands, 2: the values' too (defaults:
    _tiling's). group_rows: a KV head's query heads padded to at least this many rows (KV-first: 8 or more)."""
    (batch, num_q_heads, dim), num_kv_heads = q.shape, k_pool.shape[1]
    group = num_q_heads // num_kv_heads
    assert q.stride(2) == k_pool.stride(2) == slot_table.stride(1) == 1 and k_pool.stride() == v_pool.stride()
    fp8 = k_pool.dtype == torch.float8_e4m3fn
    block_n, num_stages, kv_first, fp8_products = _tiling(dim, fp8, block_n, num_stages, kv_first, fp8_products)
    splits = splits or default_splits(batch * num_kv_heads)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    max_len = seq_lens.amax(0, keepdim=True) if max_len is None else max_len
    partial = lse = out  # one split: the first kernel writes the output, these are not read
    if splits > 1:
        partial = torch.empty(batch * num_q_heads * splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch * num_q_heads * splits, dtype=torch.float32, device=q.device)
    tensors = (q, k_pool, v_pool, slot_table, req_rows, seq_lens, max_len, out if order is None else order, out)
    tensors += (partial, lse, out)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_pool.stride()[:2], slot_table.stride(0))
    pad = max(group_rows, triton.next_power_of_2(group))
    shape = dict(GROUP=group, GROUP_PAD=pad, D=dim, BLOCK_N=block_n, SPLITS=splits)
    variant = dict(F16_DOTS=fp8_in_f16 and fp8, ORDERED=order is not None, FP8_PRODUCTS=fp8_products)
    variant.update(FROM_STARTS=False, FIRST_SPLIT=0, TOTAL_SPLITS=splits, KV_FIRST=kv_first)
    _split_kv[(num_kv_heads, batch, splits)](
        *tensors, *strides, sm_scale * k_scale, v_scale, **shape, **variant, num_warps=num_warps, num_stages=num_stages
    )
    if splits > 1:
        merge_splits[(batch, num_q_heads)](partial, lse, out, out.stride(0), out.stride(1), D=dim, SPLITS=splits)
    return out


class TritonDecoder:
    """Decode steps on these kernels, for an attention backend that plans its other steps itself
    (flashinfer_backend.py). A step's attention needs only its request rows, KV lengths and longest length
    on the device (and the batch's order by length, longest first): eager, the batch's own; under CUDA
    graphs, copied into fixed buffers that every captured size reads the head of (padded rows: row 0, one
    slot)."""

    def __init__(self, pool: KVPool, head_dim: int, layers: list[LayerAttention]) -> None:
        assert all(layer.window is None and layer.softcap is None for layer in layers)
        self.pool = pool
        self.sm_scales = [layer.scale or head_dim**-0.5 for layer in layers]
        self.step: Optional[tuple[torch.Tensor, ...]] = None  # rows, lengths, longest, order
        self.graph_rows: Optional[torch.Tensor] = None
        self.graph_lens: Optional[torch.Tensor] = None
        self.graph_order: Optional[torch.Tensor] = None
        self.graph_sorted: Optional[torch.Tensor] = None  # torch.sort's values, not read
        self.graph_max = torch.ones(1, dtype=torch.int64, device=pool.device)

    def plan(self, batch: ForwardBatch) -> None:
        """An eager decode step: a decode token's KV position + 1 is the length it attends over."""
        lens = batch.positions + 1
        longest_first = torch.sort(lens, descending=True, stable=True).indices
        self.step = (batch.req_pool_indices, lens, lens.amax(0, keepdim=True), longest_first)

    def make_graph_buffers(self, max_batch_size: int) -> None:
        if self.graph_rows is None:
            self.graph_rows = torch.zeros(max_batch_size, dtype=torch.int64, device=self.pool.device)
            self.graph_lens = torch.ones(max_batch_size, dtype=torch.int64, device=self.pool.device)
            self.graph_order = torch.arange(max_batch_size, device=self.pool.device)
            self.graph_sorted = torch.ones_like(self.graph_lens)

    def plan_graph(self, batch: ForwardBatch, padded: int) -> None:
        """A decode step replayed in the graph of batch size `padded`: its rows and lengths into the buffers."""
        assert self.graph_rows is not None and self.graph_lens is not None and self.graph_order is not None
        n = batch.batch_size
        rows, lens = self.graph_rows[:padded], self.graph_lens[:padded]
        rows[:n].copy_(batch.req_pool_indices[:n])
        torch.add(batch.positions[:n], 1, out=lens[:n])
        if padded > n:
            rows[n:].zero_()
            lens[n:].fill_(1)
        torch.amax(lens, 0, keepdim=True, out=self.graph_max)
        order = self.graph_order[:padded]
        torch.sort(lens, descending=True, stable=True, out=(self.graph_sorted[:padded], order))
        self.step = (rows, lens, self.graph_max, order)

    def attend(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        """q [B, Hq, D] against the layer's pool, whose KV for this step is stored already -> [B, Hq * D]."""
        assert self.step is not None
        pool, (rows, lens, longest, order) = self.pool, self.step
        k_scale, v_scale = pool.kv_scales[layer_id]
        table = pool.req_to_token
        k, v, scale = pool.k_buffer[layer_id], pool.v_buffer[layer_id], self.sm_scales[layer_id]
        out = decode_attention(q, k, v, table, rows, lens, scale, k_scale, v_scale, max_len=longest, order=order)
        return out.reshape(q.shape[0], -1)
