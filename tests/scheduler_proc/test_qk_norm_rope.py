"""The fused q/k norm + RoPE kernel, run by Triton's CPU interpreter, against the layers it replaces on the
device: RMSNorm.forward_inplace on q and on k, then RotaryEmbedding, on slices of one q|k|v projection."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.layers.norm import RMSNorm  # noqa: E402
from scheduler_proc.layers.qk_norm_rope import qk_norm_rope  # noqa: E402
from scheduler_proc.layers.rotary import RotaryEmbedding  # noqa: E402


@pytest.mark.parametrize("num_q_heads,num_k_heads,head_dim", [(16, 8, 128), (6, 2, 64)])  # heads not a power of 2
@torch.inference_mode()
def test_equals_the_two_norms_then_rope(num_q_heads, num_k_heads, head_dim):
    gen = torch.Generator().manual_seed(head_dim + num_q_heads)
    tokens = 7
    q_size, kv_size = num_q_heads * head_dim, num_k_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen) * 2
    q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(head_dim, generator=gen) + 0.5)
    rotary = RotaryEmbedding(head_dim, 4096, 1_000_000.0, None)
    positions = torch.tensor([0, 1, 5, 100, 2047, 4000, 3])

    def views(x):
        q, k, _ = x.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(tokens, num_q_heads, head_dim), k.view(tokens, num_k_heads, head_dim)

    expected = qkv.clone()
    q, k = views(expected)
    q_norm.forward_inplace(q)
    k_norm.forward_inplace(k)
    rotary(positions, q, k)
    ours = qkv.clone()
    q, k = views(ours)
    qk_norm_rope(q, k, positions, rotary.cos_sin_cache, q_norm.weight.data, k_norm.weight.data, 1e-6)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[:, q_size + kv_size :], qkv[:, q_size + kv_size :])  # v untouched
    assert not torch.allclose(ours, qkv)
