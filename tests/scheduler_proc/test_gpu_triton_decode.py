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
