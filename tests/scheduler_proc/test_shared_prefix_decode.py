"""Cascade decode attention, run by Triton's CPU interpreter: groups of sequences whose first slots are the same
slots, each group's queries against that prefix at once and each sequence's own slots apart, equal to attention
computed in torch over every sequence's whole slot list (and to triton_decode's kernel, which reads the prefix
once per sequence)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.attention.shared_prefix_decode import shared_prefix_decode  # noqa: E402
from scheduler_proc.attention.triton_decode import decode_attention  # noqa: E402


def _reference(q, k_pool, v_pool, slot_lists, sm_scale):
    out = torch.empty_like(q)
    group = q.shape[1] // k_pool.shape[1]
    for b, slots in enumerate(slot_lists):
        k = k_pool[torch.tensor(slots)].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_pool[torch.tensor(slots)].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b], k) * sm_scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,prefix_splits,suffix_splits",
    [(14, 2, 1, 1), (14, 2, 2, 4), (8, 8, 4, 1), (4, 1, 4, 4)],  # 2 + 4 splits: the merge reads 8, two empty
)
def test_equals_attention_over_each_sequences_whole_slots(num_q_heads, num_kv_heads, prefix_splits, suffix_splits):
    gen = torch.Generator().manual_seed(num_q_heads + prefix_splits)
    dim, pool_slots = 32, 2048
    k_pool = torch.randn(pool_slots, num_kv_heads, dim, generator=gen)
    v_pool = torch.randn(pool_slots, num_kv_heads, dim, generator=gen)
    free = (torch.randperm(pool_slots - 1, generator=gen) + 1).tolist()  # scattered slots, slot 0 never used

    def take(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    # (shared prefix length, each member's own tail length): a group of one shares nothing.
    groups = [(37, [1, 5, 80]), (0, [7]), (130, [1, 1, 64, 3]), (0, [200]), (5, [2, 2])]
    slot_lists, starts, group_ptr = [], [], [0]
    for prefix_len, tails in groups:
        shared = take(prefix_len)
        for tail in tails:
            slot_lists.append(shared + take(tail))
            starts.append(prefix_len)
        group_ptr.append(len(slot_lists))
    rows = torch.randperm(len(slot_lists) + 3, generator=gen)[: len(slot_lists)]  # table rows in no order
    table = torch.randint(0, 7, (len(slot_lists) + 3, 256), dtype=torch.int32, generator=gen)  # stale garbage
    for row, slots in zip(rows.tolist(), slot_lists):
        table[row, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
    q = torch.randn(len(slot_lists), num_q_heads, dim, generator=gen)
    seq_lens = torch.tensor([len(s) for s in slot_lists])
    sm_scale = dim**-0.5
    batch = (q, k_pool, v_pool, table, rows, seq_lens, torch.tensor(group_ptr), torch.tensor(starts))
    splits = dict(prefix_splits=prefix_splits, suffix_splits=suffix_splits)
    ours = shared_prefix_decode(*batch, max_members=4, sm_scale=sm_scale, block_n=32, **splits)
    expected = _reference(q, k_pool, v_pool, slot_lists, sm_scale)
    assert torch.allclose(ours, expected, atol=2e-5, rtol=1e-4), (ours - expected).abs().max()
    flat = decode_attention(q, k_pool, v_pool, table, rows, seq_lens, sm_scale, splits=2, block_n=32)
    assert torch.allclose(ours, flat, atol=2e-5, rtol=1e-4)
