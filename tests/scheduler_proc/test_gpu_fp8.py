"""Issue 21 on the device: torch._scaled_mm against the dequantized matmul; the default model's weights as
an FP8 folder through the engine in bf16 (FP8 matmuls, CUDA graphs, flashinfer) against the dequantized
model in float32; an FP8 KV cache through flashinfer against the torch backend's FP8 pool.

Run on the device: `PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -m gpu tests/scheduler_proc/test_gpu_fp8.py`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from fp8_folders import write_fp8_folders  # noqa: E402

from scheduler_proc.layers.fp8 import (  # noqa: E402
    dequantize,
    fp8_matmul_supported,
    quantize_per_channel,
    quantize_per_token,
    scaled_mm,
)

CUDA = torch.device("cuda")
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
TEXTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "To make a cup of tea, you first",
    "The largest planet in our solar system is",
    "In 1492, Christopher Columbus",
    "A triangle has three sides and",
    "The chemical symbol for gold is",
]


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8_matmul_supported(CUDA)), reason="FP8 matmuls need compute capability 8.9"
)
def test_scaled_mm_equals_the_dequantized_matmul():
    torch.manual_seed(0)
    weight = torch.randn(4096, 1024, device=CUDA) * 0.02
    bias = torch.randn(4096, device=CUDA, dtype=torch.bfloat16)
    x = torch.randn(37, 1024, device=CUDA, dtype=torch.bfloat16)
    q, scale = quantize_per_channel(weight)
    out = scaled_mm(x, q, scale, bias)
    x_q, x_scale = quantize_per_token(x)
    expected = (x_q.float() * x_scale) @ dequantize(q, scale, torch.float32).T + bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (37, 4096)
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2)


def _greedy(model_dir: str, prompts: list[list[int]], **settings) -> list[list[int]]:
    from engine import Engine

    with Engine(model_dir, max_total_tokens=8192, log_level="warning", **settings) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose first 8 greedy tokens agree (bf16 near-ties may flip later ones)."""
    return sum(x[:8] == y[:8] for x, y in zip(a, b)) / len(a)


def test_fp8_folder_and_fp8_kv_on_the_device(tmp_path, default_model_path, tokenizer):
    # The default model's trained weights: a random model's near-uniform logits part bf16 from float32
    # within a few tokens whatever the path (lease E found that), a trained model's continuations do not.
    fp8_dir, ref_dir = write_fp8_folders(default_model_path, tmp_path, "block", (16, 32), kv_scales=True)
    prompts = [tokenizer.encode(text) for text in TEXTS]
    reference = _greedy(ref_dir, prompts, dtype="float32", attention_backend="torch", disable_cuda_graph=True)
    assert _agreement(_greedy(fp8_dir, prompts, dtype="float32", attention_backend="torch"), reference) == 1.0
    assert _agreement(_greedy(fp8_dir, prompts), reference) >= 0.75  # bf16, FP8 matmuls, CUDA graphs, flashinfer
    flashinfer_kv = _greedy(fp8_dir, prompts, kv_cache_dtype="fp8_e4m3")
    torch_kv = _greedy(fp8_dir, prompts, kv_cache_dtype="fp8_e4m3", attention_backend="torch", disable_cuda_graph=True)
    assert _agreement(flashinfer_kv, torch_kv) >= 0.75  # the same FP8 pool (scales 0.5 / 0.25) read two ways
