"""The per-token FP8 quantization kernel, run by Triton's CPU interpreter, against torch (quantize_per_token):
the same scales and the same values before the cast to e4m3 (the interpreter's own e4m3 cast is not the
device's, so the kernel writes float32 here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.layers.fp8_quant_kernel import quantize_rows, rmsnorm_quantize, silu_mul_quantize  # noqa: E402


# held in registers whole: a power of two, ragged, a hidden size; read in blocks: longer than 16,384
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 300), (3, 2500), (2, 16400)])
def test_scales_and_values_equal_torch(rows, cols):
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(rows, cols + 16, generator=gen) * 3).to(torch.bfloat16)[:, 8 : 8 + cols]  # rows strided
    x[0, :] = 0  # an all-zero row gets the floor scale, not a division by zero
    values, scale = quantize_rows(x, out_dtype=torch.float32)
    expected_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448
    assert torch.equal(scale, expected_scale)
    assert torch.equal(values, (x.float() / expected_scale).clamp(-448, 448))
    assert torch.equal(
        values.to(torch.float8_e4m3fn).float(), (x.float() / expected_scale).to(torch.float8_e4m3fn).float()
    )


def _quantized(row_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's per-token quantization of float32 rows: (values before the e4m3 cast, scale)."""
    scale = row_values.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448
    return (row_values / scale).clamp(-448, 448), scale


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cols", [64, 300])
def test_rmsnorm_quantize_equals_the_norm_then_the_quantization(with_residual, cols):
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(4, cols + 8, generator=gen) * 2).to(torch.bfloat16)[:, :cols]  # rows strided
    residual = torch.randn(4, cols, generator=gen).to(torch.bfloat16)
    weight = (torch.rand(cols, generator=gen) + 0.5).to(torch.bfloat16)
    total = x.float() + residual.float() if with_residual else x.float()
    # the unfused pair: the norm's bf16 output (statistics of the unrounded sum), quantized per token
    normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()).bfloat16().float()
    expected_values, expected_scale = _quantized(normed)
    given_residual = residual.clone() if with_residual else None
    values, scale = rmsnorm_quantize(x, weight, 1e-6, given_residual, out_dtype=torch.float32)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-2, atol=0)
    # a bf16 step of the norm's output at most (the sums of squares round apart; the interpreter truncates)
    torch.testing.assert_close(values, expected_values, rtol=1e-2, atol=0.0)
    if with_residual:  # the next residual is written in place: the sum in bf16 (the interpreter's cast to bf16
        # truncates where the device's rounds to nearest: one bf16 step apart at most)
        torch.testing.assert_close(given_residual.float(), total, rtol=2**-7, atol=0.0)
        assert not torch.equal(given_residual, residual)


@pytest.mark.parametrize("cols", [96, 9000, 17000])  # held in registers (to 16,384); two passes of 4,096
def test_silu_mul_quantize_equals_the_activation_then_the_quantization(cols):
    gen = torch.Generator().manual_seed(cols)
    gate_up = (torch.randn(3, 2 * cols, generator=gen) * 2).to(torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected_values, expected_scale = _quantized((torch.nn.functional.silu(gate) * up).bfloat16().float())
    values, scale = silu_mul_quantize(gate_up, out_dtype=torch.float32)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-2, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=1e-2, atol=0.0)


def test_an_empty_batch_launches_nothing():
    values, scale = quantize_rows(torch.zeros(0, 64), out_dtype=torch.float32)
    assert values.shape == (0, 64) and scale.shape == (0, 1)
