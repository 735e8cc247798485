"""The per-token FP8 quantization kernel, run by Triton's CPU interpreter, against torch (quantize_per_token):
the same scales and the same values before the cast to e4m3 (the interpreter's own e4m3 cast is not the
device's, so the kernel writes float32 here)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.layers.fp8_quant_kernel import quantize_rows  # noqa: E402


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


def test_an_empty_batch_launches_nothing():
    values, scale = quantize_rows(torch.zeros(0, 64), out_dtype=torch.float32)
    assert values.shape == (0, 64) and scale.shape == (0, 1)
