"""The KV store kernel, run by Triton's CPU interpreter, against indexing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.attention.store_kv import store_kv  # noqa: E402


@pytest.mark.parametrize("kv_heads,head_dim", [(2, 16), (3, 24), (20, 128)])  # rows of 32, 72 and 2,560 elements
def test_writes_the_rows_indexing_writes(kv_heads, head_dim):
    gen = torch.Generator().manual_seed(kv_heads)
    tokens, heads = 7, 2 * kv_heads
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)  # strided, as the layers give
    k_buf = torch.zeros(40, kv_heads, head_dim, dtype=torch.bfloat16)
    v_buf = torch.zeros_like(k_buf)
    loc = torch.randperm(40, generator=gen)[:tokens]
    expected_k, expected_v = k_buf.clone(), v_buf.clone()
    expected_k[loc], expected_v[loc] = k, v
    store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf, expected_k) and torch.equal(v_buf, expected_v)
    store_kv(k[:0], v[:0], k_buf, v_buf, loc[:0])  # an empty step writes nothing
    assert torch.equal(k_buf, expected_k)


def test_rows_that_are_not_contiguous_are_written_too():
    k = torch.randn(5, 16, 2).transpose(1, 2)  # [5, 2, 16]: a head's elements 2 apart
    v = torch.randn(5, 2, 16)
    k_buf, v_buf = torch.zeros(9, 2, 16), torch.zeros(9, 2, 16)
    loc = torch.tensor([8, 1, 4, 0, 6])
    store_kv(k, v, k_buf, v_buf, loc)
    assert torch.equal(k_buf[loc], k) and torch.equal(v_buf[loc], v)
