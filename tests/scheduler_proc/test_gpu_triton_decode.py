"""decode_attention_backend="triton" on the device: decode steps through triton_decode.py's kernel, eager
and in CUDA graphs, over a bf16 and an FP8 KV pool, judged by teacher-forced logprobs from flashinfer's
prefill path over the same tokens (greedy ids of a random model flip at near-ties under any bf16 change).

On the device: `PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu tests/scheduler_proc/test_gpu_triton_decode.py`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from gpu_reference import TEXTS, greedy_with_logprobs, mean_logprob_gap, teacher_forced_logprobs  # noqa: E402
from reference import tiny_model_dir  # noqa: E402


def test_triton_decode_scores_as_flashinfer_eager_and_in_graphs(tmp_path, default_model_path, tokenizer):
    # head_dim 64, two query heads a KV head
    model = tiny_model_dir(tmp_path, "llama", default_model_path, hidden_size=256, intermediate_size=512)
    prompts = [tokenizer.encode(text) for text in TEXTS]
    # Six prompts in graphs of up to 8 rows: the step is padded (the padded rows read row 0's first slot).
    batches = {"graphs": (prompts[:6], {"cuda_graph_max_bs": 8}), "eager": (prompts, {"disable_cuda_graph": True})}
    for kv in ({}, {"kv_cache_dtype": "fp8_e4m3"}):
        runs = {
            name: (batch, greedy_with_logprobs(model, batch, decode_attention_backend="triton", **graphs, **kv))
            for name, (batch, graphs) in batches.items()
        }
        # One scoring engine for both runs' sequences (engines are most of this test's device time).
        sequences = [p + ids for batch, run in runs.values() for p, (ids, _) in zip(batch, run)]
        scores = teacher_forced_logprobs(model, sequences, disable_cuda_graph=True, **kv)
        at = 0
        for name, (batch, run) in runs.items():
            # Two bf16 paths over the same weights and pool: rounding alone (a wrong slot or scale: whole units).
            gap = mean_logprob_gap(batch, run, scores[at : at + len(batch)])
            assert gap < 0.25, (kv, name, gap)
            at += len(batch)


@pytest.mark.parametrize("group", [4, 2], ids=["llama_heads", "qwen3_heads"])
def test_fp8_products_and_eight_rows_on_the_device(group):
    # The kernel's FP8 variants at head_dim 128 against float32 attention over the dequantized pool. With the
    # scores on e4m3 operands the query is rounded as the device rounds it (torch's cast is the same RN), so
    # the reference rounds it too and the bar is float error; with the values' too, the softmax weights are
    # rounded to e4m3 under a running maximum no reference reproduces: each weight within 2^-4 of its value,
    # so the output within 2^-3 of the values' largest magnitude, well inside a wrong scale's whole units.
    from scheduler_proc.attention.triton_decode import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(group)
    batch, kv_heads, dim = 48, 8, 128
    lengths = torch.randint(1, 700, (batch,), generator=gen, device="cuda")
    table = torch.randperm(batch * 700, generator=gen, device="cuda").int().view(batch, 700) + 1
    pool_shape = (batch * 700 + 1, kv_heads, dim)
    k_pool = torch.randn(pool_shape, generator=gen, device="cuda").mul(2).to(torch.float8_e4m3fn)
    v_pool = torch.randn(pool_shape, generator=gen, device="cuda").mul(2).to(torch.float8_e4m3fn)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen, device="cuda").to(torch.bfloat16)
    rows, scales = torch.arange(batch, device="cuda"), (dim**-0.5, 0.7, 1.3)

    def reference(query):
        out = torch.empty(batch, kv_heads * group, dim, device="cuda")
        for b in range(batch):
            slots = table[b, : lengths[b]].long()
            k = (k_pool[slots].float() * scales[1]).repeat_interleave(group, dim=1)
            v = (v_pool[slots].float() * scales[2]).repeat_interleave(group, dim=1)
            weights = (torch.einsum("hd,lhd->hl", query[b], k) * scales[0]).softmax(-1)
            out[b] = torch.einsum("hl,lhd->hd", weights, v)
        return out

    groups = q.float().unflatten(1, (kv_heads, group))
    q_scale = groups.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-30) / 448.0
    rounded = ((groups / q_scale).to(torch.float8_e4m3fn).float() * q_scale).flatten(1, 2)
    exact, of_rounded = reference(q.float()), reference(rounded)
    largest = v_pool.float().abs().max().item() * scales[2]
    args = (q, k_pool, v_pool, table, rows, lengths, *scales)
    for kv_first, products, rows_a_product in [
        (False, 0, 16),
        (True, 1, 16),
        (True, 1, 8),
        (True, 2, 16),
        (True, 2, 8),
    ]:
        tiling = dict(kv_first=kv_first, fp8_products=products, group_rows=rows_a_product)
        ours = decode_attention(*args, **tiling).float()
        expected = exact if products == 0 else of_rounded
        # bf16 output (half an ulp: 2^-9 relative) and fp16 weights; or the weights rounded to e4m3. (The query's
        # rounding alone moves outputs by ~0.2 here: the reference's rounded query must match the kernel's.)
        bar = 0.03 + expected.abs() / 128 if products < 2 else torch.full_like(expected, largest / 8)
        assert ((ours - expected).abs() <= bar).all(), (tiling, (ours - expected).abs().max().item())
