"""The Triton linear-layer GEMM candidate, run by Triton's CPU interpreter, against the product computed in float32
by torch: shapes that fill no tile exactly, K split into partials or not, with and without a bias. In float16:
the interpreter's tl.dot reads bfloat16 tiles as raw bits (sm90_compile.py compiles the bfloat16 variant)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.layers.triton_linear import LinearConfig, default_config, triton_linear  # noqa: E402


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (5, 40, 72, LinearConfig(block_m=16, block_n=16, block_k=16)),  # edges in every dimension
        (33, 24, 100, LinearConfig(block_m=16, block_n=16, block_k=32, split_k=3)),  # the last split ends early
        (16, 16, 16, LinearConfig(block_m=16, block_n=16, block_k=16, split_k=2)),  # a split with nothing to read
        (3, 50, 64, None),  # the default tiling and split
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_float32_product(m, n, k, config, with_bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    weight = torch.randn(n, k, generator=gen).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(torch.float16) if with_bias else None
    want = x.float() @ weight.float().T + (bias.float() if with_bias else 0.0)
    got = triton_linear(x, weight, bias, config)
    assert got.dtype == torch.float16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_leading_dimensions_are_kept():
    x = torch.randn(2, 3, 32).to(torch.float16)
    weight = torch.randn(24, 32).to(torch.float16)
    got = triton_linear(x, weight, config=LinearConfig(block_m=16, block_n=16, block_k=16))
    torch.testing.assert_close(got.float(), (x.float() @ weight.float().T), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("split_k", [1, 3])
def test_scales_multiply_rows_and_columns(split_k):
    """FP8 operands' scales (one per row of x, one per output row of the weight) applied in the epilogue; run
    here in float16 operands, as the interpreter has no FP8 dot (the device test runs FP8)."""
    gen = torch.Generator().manual_seed(7 + split_k)
    x = torch.randn(6, 96, generator=gen).to(torch.float16)
    weight = torch.randn(40, 96, generator=gen).to(torch.float16)
    x_scale, w_scale = torch.rand(6, 1, generator=gen) + 0.5, torch.rand(40, generator=gen) + 0.5
    config = LinearConfig(block_m=16, block_n=16, block_k=16, split_k=split_k)
    got = triton_linear(x, weight, None, config, scales=(x_scale, w_scale), out_dtype=torch.float32)
    want = (x.float() * x_scale) @ (weight.float() * w_scale[:, None]).T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_split_partials_are_summed_in_order():
    """The same inputs give the same bits: the splits' partials are summed by one kernel in split order."""
    x = torch.randn(8, 256).to(torch.float16)
    weight = torch.randn(16, 256).to(torch.float16)
    config = LinearConfig(block_m=16, block_n=16, block_k=32, split_k=4)
    assert torch.equal(triton_linear(x, weight, config=config), triton_linear(x, weight, config=config))


def test_default_split_fills_the_sms_once():
    # A Qwen2.5-0.5B o_proj at 256 rows: 4 x 14 tiles of 64 x 64, so K is split in two (112 programs).
    assert default_config(256, 896, 896).split_k == 2
    # Plenty of tiles already (gate_up: 4 x 152): no split.
    assert default_config(256, 9728, 896).split_k == 1
    # Few tiles and a long K (down_proj at 64 rows: 1 x 14): split while each split keeps four blocks.
    assert default_config(64, 896, 4864).split_k == 8
