"""The split-KV Triton decode attention, run by Triton's CPU interpreter, against attention computed in torch
over the same pool slots: grouped query heads, sequences of 1 to a few hundred tokens over scattered slots,
one or several splits (slices as long as the longest sequence's, so short sequences have splits with nothing
to read), and a scaled (FP8-style) pool."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.attention.triton_decode import decode_attention  # noqa: E402


def _table(slot_lists: list[list[int]], rows: list[int], width: int) -> torch.Tensor:
    """A request-to-token table holding each sequence's slots at its row (other entries: stale garbage)."""
    table = torch.randint(0, 7, (max(rows) + 2, width), dtype=torch.int32)
    for row, slots in zip(rows, slot_lists):
        table[row, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
    return table


def _reference(q, k_pool, v_pool, slot_lists, sm_scale, k_scale, v_scale):
    out = torch.empty_like(q)
    group = q.shape[1] // k_pool.shape[1]
    for b in range(q.shape[0]):
        slots = torch.tensor(slot_lists[b])
        k = (k_pool[slots].float() * k_scale).repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = (v_pool[slots].float() * v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,dim,splits,scales,block_n",
    [
        (16, 8, 128, 1, (1.0, 1.0), 32),
        (8, 2, 64, 4, (1.0, 1.0), 32),
        (4, 1, 64, 8, (0.5, 2.0), 32),
        (14, 2, 64, 2, (1.0, 1.0), None),  # Qwen2.5-0.5B's group of 7 in the default tiling: 128-token blocks
    ],
)
@pytest.mark.parametrize("kv_first", [False, True], ids=["q_first", "kv_first"])
def test_equals_attention_over_the_same_slots(num_q_heads, num_kv_heads, dim, splits, scales, block_n, kv_first):
    gen = torch.Generator().manual_seed(dim + splits)
    lengths = [1, 37, 300, 5, 128]
    pool_slots = 1024
    k_pool = torch.randn(pool_slots, num_kv_heads, dim, generator=gen)
    v_pool = torch.randn(pool_slots, num_kv_heads, dim, generator=gen)
    order = (torch.randperm(pool_slots - 1, generator=gen) + 1).tolist()  # scattered slots, slot 0 never used
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    slot_lists = [order[s : s + n] for s, n in zip(starts, lengths)]
    rows = [3, 0, 5, 1, 6]  # the sequences' rows of the table, in no order
    table = _table(slot_lists, rows, width=320)
    q = torch.randn(len(lengths), num_q_heads, dim, generator=gen)
    sm_scale = dim**-0.5
    req_rows, seq_lens = torch.tensor(rows), torch.tensor(lengths)
    pool_args = (q, k_pool, v_pool, table, req_rows, seq_lens, sm_scale, *scales)
    ours = decode_attention(*pool_args, splits=splits, block_n=block_n, kv_first=kv_first)
    expected = _reference(q, k_pool, v_pool, slot_lists, sm_scale, *scales)
    assert torch.allclose(ours, expected, atol=2e-5, rtol=1e-4), (ours - expected).abs().max()
    # Any bound on the longest length slices alike (a CUDA graph's is the step's; a loose one leaves splits idle).
    loose_args = (*pool_args, torch.tensor([1000]), splits, block_n)
    ours = decode_attention(*loose_args, kv_first=kv_first)
    assert torch.allclose(ours, expected, atol=2e-5, rtol=1e-4), (ours - expected).abs().max()
    longest_first = torch.argsort(seq_lens, descending=True)  # programs started in another order, same sums
    assert torch.equal(decode_attention(*loose_args, order=longest_first, kv_first=kv_first), ours)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (14, 2), (4, 4)], ids=["group_4", "group_7", "group_1"])
def test_kv_first_with_eight_rows_a_product(num_q_heads, num_kv_heads):
    # A KV head's query heads padded to 8 rows, not 16 (wgmma's least on Hopper): the same attention.
    gen = torch.Generator().manual_seed(num_q_heads)
    lengths, dim = [3, 90, 1], 64
    k_pool, v_pool = torch.randn(2, 256, num_kv_heads, dim, generator=gen)
    slot_lists = [list(range(1, 4)), list(range(100, 190)), [7]]
    table = _table(slot_lists, [1, 0, 2], width=128)
    q = torch.randn(len(lengths), num_q_heads, dim, generator=gen)
    pool_args = (q, k_pool, v_pool, table, torch.tensor([1, 0, 2]), torch.tensor(lengths), 0.125)
    for splits in (1, 2):
        ours = decode_attention(*pool_args, splits=splits, block_n=32, kv_first=True, group_rows=8)
        expected = _reference(q, k_pool, v_pool, slot_lists, 0.125, 1.0, 1.0)
        assert torch.allclose(ours, expected, atol=2e-5, rtol=1e-4), (ours - expected).abs().max()


def test_a_strided_query_as_the_qkv_projection_gives_it():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(3, (8 + 2 * 2) * 64, generator=gen)
    q = qkv[:, : 8 * 64].view(3, 8, 64)  # rows strided by the whole projection
    k_pool, v_pool = torch.randn(64, 2, 64, generator=gen), torch.randn(64, 2, 64, generator=gen)
    slot_lists = [list(range(1, 11)), [11], list(range(12, 41))]
    table = _table(slot_lists, [0, 1, 2], width=64)
    ours = decode_attention(q, k_pool, v_pool, table, torch.tensor([0, 1, 2]), torch.tensor([10, 1, 29]), 0.125)
    expected = _reference(q.contiguous(), k_pool, v_pool, slot_lists, 0.125, 1.0, 1.0)
    assert torch.allclose(ours, expected, atol=2e-5)


def test_the_decoder_reads_req_to_token_eager_and_from_graph_buffers_with_padding():
    from scheduler_proc.attention.base import LayerAttention
    from scheduler_proc.attention.triton_decode import TritonDecoder
    from scheduler_proc.forward_batch import ForwardBatch
    from scheduler_proc.kv_pool import KVPool

    gen = torch.Generator().manual_seed(2)
    pool = KVPool(2, 64, 2, 32, torch.float32, torch.device("cpu"), max_requests=6, max_context=40)
    pool.k_buffer.copy_(torch.randn(pool.k_buffer.shape, generator=gen))
    pool.v_buffer.copy_(torch.randn(pool.v_buffer.shape, generator=gen))
    pool.kv_scales = [(1.0, 1.0), (0.5, 2.0)]  # layer 1 as an FP8 pool's scales
    rows, lengths = [4, 1, 2], [5, 1, 17]  # KV lengths with this step's token
    order = (torch.randperm(63, generator=gen) + 1).tolist()
    slot_lists = [order[sum(lengths[:i]) : sum(lengths[: i + 1])] for i in range(3)]
    for row, slots in zip(rows, slot_lists):
        pool.req_to_token[row, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
    batch = ForwardBatch(
        input_ids=torch.zeros(3, dtype=torch.int64),
        positions=torch.tensor(lengths) - 1,
        out_cache_loc=torch.tensor([s[-1] for s in slot_lists]),
        req_pool_indices=torch.tensor(rows),
        prefix_lens_cpu=[n - 1 for n in lengths],
        extend_lens_cpu=[1, 1, 1],
        logit_rows=torch.arange(3),
        is_decode=True,
    )
    decoder = TritonDecoder(pool, 32, [LayerAttention(), LayerAttention(scale=0.25)])
    q = torch.randn(3, 4, 32, generator=gen)
    decoder.plan(batch)
    eager = [decoder.attend(q, layer) for layer in (0, 1)]
    for layer, sm_scale in ((0, 32**-0.5), (1, 0.25)):
        expected = _reference(
            q, pool.k_buffer[layer], pool.v_buffer[layer], slot_lists, sm_scale, *pool.kv_scales[layer]
        )
        assert torch.allclose(eager[layer], expected.reshape(3, -1), atol=2e-5, rtol=1e-4)

    decoder.make_graph_buffers(8)
    decoder.plan_graph(batch, padded=4)  # a graph of 4 rows: the fourth reads row 0, one slot
    padded = decoder.attend(torch.cat([q, torch.randn(1, 4, 32, generator=gen)]), 1)
    assert torch.equal(padded[:3], eager[1]) and padded[3].isfinite().all()
    assert decoder.graph_rows[:4].tolist() == rows + [0] and decoder.graph_lens[:4].tolist() == lengths + [1]
    assert decoder.graph_max.tolist() == [17] and decoder.graph_order[:4].tolist() == [2, 0, 1, 3]


@pytest.mark.parametrize(
    "kv_first,group_rows", [(False, 16), (True, 16), (True, 8)], ids=["q_first", "kv_first", "8_rows"]
)
@pytest.mark.parametrize("splits", [1, 4])
def test_fp8_scores_over_a_query_that_e4m3_holds_equal_attention(kv_first, group_rows, splits):
    # The kernel scales each (sequence, KV head)'s query rows by one scale, largest magnitude to e4m3's 448, and
    # rounds them to e4m3. Here every row is e4m3 values times a power of two, one of them 448: the scaled rows
    # are exact (the interpreter's float-to-e4m3 conversion does not round as the device does, so rounding
    # itself is the GPU test's), and a wrong scale anywhere in the scores shows as whole units.
    gen = torch.Generator().manual_seed(7 + splits)
    lengths, num_q_heads, num_kv_heads, dim = [1, 70, 200], 8, 2, 64
    pool_slots = 512
    k_pool = (torch.randn(pool_slots, num_kv_heads, dim, generator=gen) * 3).to(torch.float8_e4m3fn)
    v_pool = (torch.randn(pool_slots, num_kv_heads, dim, generator=gen) * 3).to(torch.float8_e4m3fn)
    order = (torch.randperm(pool_slots - 1, generator=gen) + 1).tolist()
    slot_lists = [order[sum(lengths[:i]) : sum(lengths[: i + 1])] for i in range(len(lengths))]
    rows = [2, 0, 1]
    table = _table(slot_lists, rows, width=256)
    values = (torch.randn(len(lengths), num_q_heads, dim, generator=gen) * 100).to(torch.float8_e4m3fn).float()
    values = torch.where(values.abs() < 1, 0.0, values)  # normal e4m3 numbers only
    values[:, ::4, 0] = 448.0  # each KV head's first query head holds its group's largest magnitude
    q = values * 2.0 ** torch.tensor([-9, -3, -6])[:, None, None]  # scales: 2^-9 / 448 ...
    pool_args = (q, k_pool, v_pool, table, torch.tensor(rows), torch.tensor(lengths), dim**-0.5, 0.5, 2.0)
    expected = _reference(q, k_pool, v_pool, slot_lists, dim**-0.5, 0.5, 2.0)
    for block_n in (32, None):  # None: the default block (128 tokens at head_dim 64): one block a short split
        tiling = dict(splits=splits, block_n=block_n, kv_first=kv_first, group_rows=group_rows)
        ours = decode_attention(*pool_args, **tiling, fp8_products=1)
        assert torch.allclose(ours, expected, atol=2e-3, rtol=1e-3), (ours - expected).abs().max()


@pytest.mark.parametrize("group_rows", [16, 8])
@pytest.mark.parametrize("splits", [1, 4])
def test_fp8_values_weight_the_values_as_the_softmax_does(group_rows, splits):
    # fp8_products=2 rounds the softmax weights (times 2^8) to e4m3 for the values' product. The interpreter's
    # float-to-e4m3 conversion does not round as the device does, so here every weight is 1 or ~0: each
    # query row's scores are at its maximum on a few of its tokens and far below it on the rest, and the output
    # is the mean of those tokens' values (a weight not scaled back, or the values' product mis-wired, is off
    # by whole units). The block of the maximum comes late in some sequences: the running rescale counts too.
    gen = torch.Generator().manual_seed(splits + group_rows)
    lengths, num_q_heads, num_kv_heads, dim = [5, 130, 64], 8, 2, 64
    k_pool = torch.zeros(256, num_kv_heads, dim)
    v_pool = (torch.randn(256, num_kv_heads, dim, generator=gen) * 4).to(torch.float8_e4m3fn)
    slot_lists = [list(range(1, 6)), list(range(6, 136)), list(range(136, 200))]
    hot = {0: [0, 3], 1: [2, 70, 129], 2: [63]}  # the tokens at each sequence's maximum, by position
    for b, positions in hot.items():
        for at in positions:
            k_pool[slot_lists[b][at], :, 0] = 16.0  # q's first coordinate is 1: scores 16 * scale above the rest
    q = torch.zeros(len(lengths), num_q_heads, dim)
    q[:, :, 0] = 1.0
    table = _table(slot_lists, [0, 1, 2], width=256)
    pool_args = (q, k_pool.to(torch.float8_e4m3fn), v_pool, table, torch.tensor([0, 1, 2]), torch.tensor(lengths))
    tiling = dict(splits=splits, block_n=32, kv_first=True, group_rows=group_rows, fp8_products=2)
    ours = decode_attention(*pool_args, 8.0, 1.0, 0.5, **tiling)  # scores 128 apart: the rest weigh e^-128
    for b, positions in hot.items():
        mean = torch.stack([v_pool[slot_lists[b][at]].float() for at in positions]).mean(0) * 0.5  # [Hkv, D]
        expected = mean.repeat_interleave(num_q_heads // num_kv_heads, dim=0)
        assert torch.allclose(ours[b], expected, atol=1e-5), (b, (ours[b] - expected).abs().max())
