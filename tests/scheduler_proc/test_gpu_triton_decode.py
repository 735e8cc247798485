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
    for kv in ({}, {"kv_cache_dtype": "fp8_e4m3"}):
        for graphs in ({"cuda_graph_max_bs": len(prompts)}, {"disable_cuda_graph": True}):
            runs = greedy_with_logprobs(model, prompts, decode_attention_backend="triton", **kv, **graphs)
            sequences = [p + ids for p, (ids, _) in zip(prompts, runs)]
            scores = teacher_forced_logprobs(model, sequences, disable_cuda_graph=True, **kv)
            # Two bf16 paths over the same weights and pool: rounding alone (a wrong slot or scale: whole units).
            assert mean_logprob_gap(prompts, runs, scores) < 0.25, (kv, graphs)
