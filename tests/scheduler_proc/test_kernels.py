"""CPU fast paths: the oneDNN packed-weight linear and the torch attention backend (causal, sliding window,
score scale and soft cap), against plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scheduler_proc.attention.base import LayerAttention
from scheduler_proc.attention.torch_backend import TorchBackend
from scheduler_proc.forward_batch import ForwardBatch, to_device_int64
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.layers.linear import ColumnParallelLinear, Part


def Linear(in_features: int, out_features: int, bias: bool) -> ColumnParallelLinear:
    """A plain linear layer as the models build one: a column-parallel layer of one part, one rank."""
    return ColumnParallelLinear(in_features, [Part("w", out_features, 1, 0)], bias=bias)


@pytest.mark.parametrize("rows", [1, 7, 16, 168])
def test_linear_matches_f_linear(rows):
    torch.manual_seed(0)
    layer = Linear(576, 960, bias=True)
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        out = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert layer.matmul._packed is not None  # the oneDNN path ran
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_linear_repacks_after_the_weight_changes_in_place():
    torch.manual_seed(0)
    layer = Linear(64, 32, bias=False)
    x = torch.randn(4, 64)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with torch.inference_mode():
        after = layer(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_when_grad_is_on():
    layer = Linear(8, 4, bias=False)
    layer(torch.randn(2, 8)).sum().backward()
    assert layer.weight.grad is not None and layer.matmul._packed is None


def _reference_attention(q, k_all, v_all, prefix, extend, layer):
    """Per sequence: causal attention of its new queries over its whole KV (keys within the window), scores
    scaled and soft-capped as the layer says, written out plainly."""
    outs, t0 = [], 0
    for seq, (p, e) in enumerate(zip(prefix, extend)):
        qs = q[t0 : t0 + e].transpose(0, 1)  # [H, e, D]
        groups = qs.shape[0] // k_all[seq].shape[1]
        ks = k_all[seq][: p + e].transpose(0, 1).repeat_interleave(groups, 0)
        vs = v_all[seq][: p + e].transpose(0, 1).repeat_interleave(groups, 0)
        query_pos, key_pos = (p + torch.arange(e))[:, None], torch.arange(p + e)[None, :]
        mask = key_pos <= query_pos
        if layer.window is not None:
            mask &= key_pos > query_pos - layer.window
        scores = qs @ ks.transpose(1, 2) * (layer.scale or qs.shape[-1] ** -0.5)
        if layer.softcap is not None:
            scores = torch.tanh(scores / layer.softcap) * layer.softcap
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vs
        outs.append(out.transpose(0, 1).reshape(e, -1))
        t0 += e
    return torch.cat(outs)


LAYER_KINDS = [LayerAttention(), LayerAttention(window=3), LayerAttention(window=1, scale=0.3, softcap=2.0)]


@pytest.mark.parametrize("layer", LAYER_KINDS, ids=["causal", "window", "window-scale-softcap"])
@pytest.mark.parametrize("prefix,extend", [([5, 9, 2], [1, 1, 1]), ([0, 4, 7], [6, 1, 3]), ([3, 3], [1, 1])])
def test_torch_backend_matches_per_sequence_attention(prefix, extend, layer):
    torch.manual_seed(0)
    heads, kv_heads, dim = 6, 2, 8
    pool = KVPool(1, 64, kv_heads, dim, torch.float32, torch.device("cpu"), 4, 32)
    k_all = [torch.randn(p + e, kv_heads, dim) for p, e in zip(prefix, extend)]
    v_all = [torch.randn(p + e, kv_heads, dim) for p, e in zip(prefix, extend)]
    new_loc = []
    for seq, p in enumerate(prefix):  # the cached prefix is in the pool already; slots are scattered
        slots = pool.alloc_slots(p + extend[seq]).flip(0)
        pool.req_to_token[seq, : p + extend[seq]] = slots.to(torch.int32)
        pool.k_buffer[0][slots[:p]] = k_all[seq][:p]
        pool.v_buffer[0][slots[:p]] = v_all[seq][:p]
        new_loc.append(slots[p:])
    batch = ForwardBatch(
        input_ids=torch.zeros(sum(extend), dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix, extend)]),
        out_cache_loc=torch.cat(new_loc),
        req_pool_indices=torch.arange(len(prefix)),
        prefix_lens_cpu=prefix,
        extend_lens_cpu=extend,
        logit_rows=torch.zeros(0, dtype=torch.int64),
        is_decode=all(e == 1 for e in extend),
    )
    backend = TorchBackend(pool, [layer])
    backend.plan(batch)
    q = torch.randn(sum(extend), heads, dim)
    k_new = torch.cat([k[p:] for k, p in zip(k_all, prefix)])
    v_new = torch.cat([v[p:] for v, p in zip(v_all, prefix)])
    out = backend.forward(q, k_new, v_new, 0)
    expected = _reference_attention(q, k_all, v_all, prefix, extend, layer)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_step_index_arrays_upload_as_aligned_views_of_one_buffer():
    lists = [[1, 2, 3], [4], [], [5, 6], [7, 8, 9]]
    views = to_device_int64(*lists, device=torch.device("cpu"))
    assert [view.tolist() for view in views] == lists
    assert len({view.untyped_storage().data_ptr() for view in views}) == 1
    # Triton specializes pointers on 16-byte alignment: a view at another alignment would recompile a kernel.
    assert all(view.data_ptr() % 16 == 0 for view in views)


def test_flashinfer_backend_refuses_a_head_size_it_has_no_kernels_for():
    from scheduler_proc.attention import create_backend

    with pytest.raises(ValueError, match="head_dim"):
        create_backend("flashinfer", None, "cuda", num_heads=4, num_kv_heads=2, head_dim=16)


def test_decode_steps_run_on_triton_by_default_where_its_kernel_applies():
    from scheduler_proc.attention import decodes_on_triton
    from scheduler_proc.attention.base import LayerAttention

    plain, scaled = [LayerAttention()] * 2, [LayerAttention(scale=0.1)] * 2
    gemma = [LayerAttention(window=4096, softcap=50.0), LayerAttention(softcap=50.0)]
    assert decodes_on_triton(None, None) and decodes_on_triton(None, plain) and decodes_on_triton(None, scaled)
    assert decodes_on_triton("triton", plain)
    assert not decodes_on_triton("flashinfer", plain)
    assert not decodes_on_triton(None, gemma)  # the default falls back to flashinfer's windowed, capped kernels
    with pytest.raises(ValueError, match="decode_attention_backend='triton' has no sliding window or soft cap"):
        decodes_on_triton("triton", gemma)
