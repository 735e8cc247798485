"""The Triton GEMM candidate (layers/triton_linear.py) on the device, in bfloat16 (Triton's CPU interpreter reads
bfloat16 tiles as raw bits, so its tests there run in float16): at a decode step's shapes, with K split or not,
with a bias, it equals cuBLAS within bfloat16 rounding, and gives the same bits every call.

On the device: `PYTHONPATH=/tmp/site:$PWD python3 -m pytest -m gpu tests/scheduler_proc/test_gpu_triton_linear.py`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

import torch.nn.functional as F  # noqa: E402

from scheduler_proc.layers.fp8 import quantize_per_channel, quantize_per_token  # noqa: E402
from scheduler_proc.layers.triton_linear import LinearConfig, triton_linear  # noqa: E402


@pytest.mark.parametrize("m,n,k", [(256, 1152, 896), (256, 896, 4864), (37, 9728, 896), (512, 4096, 1024)])
@pytest.mark.parametrize(
    "config", [None, LinearConfig(128, 128, 64, num_warps=8), LinearConfig(64, 64, 64, split_k=4)], ids=str
)
def test_equals_cublas_in_bfloat16(m, n, k, config):
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = F.linear(x.float(), weight.float(), bias.float())
    got = triton_linear(x, weight, bias, config)
    # Both accumulate in float32; the outputs round to bfloat16 (8 bits of mantissa) once.
    torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.02)
    assert torch.equal(got, triton_linear(x, weight, bias, config))


@pytest.mark.parametrize("m,n,k", [(256, 6144, 4096), (512, 4096, 14336), (37, 1024, 3072)])
@pytest.mark.parametrize("config", [None, LinearConfig(64, 128, 128, split_k=2)], ids=str)
def test_fp8_equals_scaled_mm(m, n, k, config):
    """FP8 operands with their scales: the result of torch._scaled_mm (the FP8 layers' GEMM) within bf16."""
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
    x_q, x_scale = quantize_per_token(x)
    w_q, w_scale = quantize_per_channel(weight)
    want = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)
    got = triton_linear(x_q, w_q, None, config, scales=(x_scale, w_scale), out_dtype=torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), atol=0.02, rtol=0.02)
    assert torch.equal(got, triton_linear(x_q, w_q, None, config, scales=(x_scale, w_scale), out_dtype=torch.bfloat16))
