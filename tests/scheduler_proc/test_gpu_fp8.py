"""Issue 21 on the device (not run where this was written: no GPU there): torch._scaled_mm against the
dequantized matmul; an FP8 folder through the engine in bf16 (FP8 matmuls, CUDA graphs, flashinfer) against
the dequantized model; an FP8 KV cache through flashinfer against the torch backend's FP8 pool.

Run on the device: `PYTHONPATH=/tmp/site:$PWD python3 -m pytest -q -m gpu tests/scheduler_proc/test_gpu_fp8.py`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from fp8_folders import write_fp8_folders  # noqa: E402
from reference import tiny_model_dir  # noqa: E402

from scheduler_proc.layers.fp8 import (  # noqa: E402
    dequantize,
    fp8_matmul_supported,
    quantize_per_channel,
    quantize_per_token,
    scaled_mm,
)

CUDA = torch.device("cuda")
PROMPTS = [[(11 + 97 * i + 13 * j) % 49000 + 10 for j in range(60)] for i in range(6)]
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


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


def _greedy(model_dir: str, **settings) -> list[list[int]]:
    from engine import Engine

    with Engine(model_dir, max_total_tokens=8192, log_level="warning", **settings) as engine:
        return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose first 8 greedy tokens agree (bf16 near-ties may flip later ones)."""
    return sum(x[:8] == y[:8] for x, y in zip(a, b)) / len(a)


def test_fp8_folder_and_fp8_kv_on_the_device(tmp_path, default_model_path):
    # head_dim 64: the smallest flashinfer's attention and RoPE kernels are built for
    source = tiny_model_dir(tmp_path, "llama", default_model_path, hidden_size=256, intermediate_size=512)
    fp8_dir, ref_dir = write_fp8_folders(source, tmp_path, "block", (16, 32), kv_scales=True)
    reference = _greedy(ref_dir, dtype="float32", attention_backend="torch", disable_cuda_graph=True)
    assert _agreement(_greedy(fp8_dir, dtype="float32", attention_backend="torch"), reference) == 1.0
    assert _agreement(_greedy(fp8_dir), reference) >= 0.8  # bf16, FP8 matmuls, CUDA graphs, flashinfer
    flashinfer_kv = _greedy(fp8_dir, kv_cache_dtype="fp8_e4m3")
    torch_kv = _greedy(fp8_dir, kv_cache_dtype="fp8_e4m3", attention_backend="torch", disable_cuda_graph=True)
    assert _agreement(flashinfer_kv, torch_kv) >= 0.8  # the same FP8 pool (scales 0.5 / 0.25) read two ways
