"""Compile every Triton kernel of the project for an H100/H200 (sm_90) on a machine without a GPU: each
public wrapper is called on CPU tensors of the device's dtypes, with Triton's driver answering for an sm_90
device and its launch cut after the compile. Triton's interpreter (the kernels' parity tests) runs the
kernels as Python and so cannot see what only the compiler rejects (a constexpr branch's dead arm, a
type mismatch between returns, a block shape that is not a power of two). Run by
test_kernels_compile_sm90.py in a process of its own: TRITON_INTERPRET must be unset when triton is imported.
Prints one line per compiled variant; exits non-zero on the first failure."""

from __future__ import annotations

import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class _Sm90:
    """The calls JITFunction.run makes of the active driver, answered for device 0, an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


_compiled: list[str] = []


def _compile_only(run):
    def wrapped(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        assert kernel is not None and kernel.asm.get("cubin"), self.fn.__name__
        _compiled.append(self.fn.__name__)
        return kernel

    return wrapped


def _sampling():
    from scheduler_proc.fused_sample import fused_sample

    rows, vocab = 4, 49_155  # a vocabulary that is not a multiple of the block or of 32
    logits = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    index, temperature = torch.arange(rows), torch.full((rows,), 0.7)
    bits = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)
    for hashed in (True, False):
        rng = (
            {"seeds": torch.zeros(rows, dtype=torch.int64), "positions": torch.zeros(rows, dtype=torch.int64)}
            if hashed
            else {"uniform": torch.rand(rows)}
        )
        fused_sample(logits, index, temperature, **rng)
        fused_sample(logits, index, temperature, bits=bits, bits_vocab=vocab, **rng)  # every row constrained
        some = torch.tensor([True, False, True, False])
        fused_sample(logits, index, temperature, bits=bits, bits_vocab=vocab, constrained=some, **rng)


def _attention():
    from scheduler_proc.attention.shared_prefix_decode import shared_prefix_decode
    from scheduler_proc.attention.store_kv import store_kv
    from scheduler_proc.attention.triton_decode import decode_attention

    table = torch.zeros(4, 64, dtype=torch.int32)  # the pool's req_to_token
    rows, lens = torch.tensor([2, 0]), torch.tensor([3, 7])
    for heads, kv_heads, dim in ((16, 8, 128), (32, 8, 128), (14, 2, 64)):
        q = torch.zeros(2, heads, dim, dtype=torch.bfloat16)
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            pool = torch.zeros(64, kv_heads, dim, dtype=kv_dtype)
            for splits in (None, 1):  # several splits and a merge; one split, written by the first kernel
                for order in (None, torch.tensor([1, 0])):  # batch order; longest first (the engine's)
                    decode_attention(q, pool, pool.clone(), table, rows, lens, dim**-0.5, splits=splits, order=order)
                decode_attention(q, pool, pool.clone(), table, rows, lens, dim**-0.5, splits=splits, kv_first=True)
                args = (q, pool, pool.clone(), table, rows, lens, dim**-0.5)
                decode_attention(*args, splits=splits, kv_first=True, group_rows=8)  # wgmma's least N
                if kv_dtype == torch.float8_e4m3fn:  # products on FP8 operands: the scores' (both orders), both
                    for kv_first, products in ((False, 1), (True, 1), (True, 2)):
                        decode_attention(*args, splits=splits, kv_first=kv_first, fp8_products=products)
                        decode_attention(*args, splits=splits, kv_first=True, fp8_products=products, group_rows=8)
            kv = torch.zeros(3, kv_heads, dim, dtype=kv_dtype)
            store_kv(kv, kv.clone(), pool, pool.clone(), torch.tensor([1, 2, 3]))
            groups, starts = torch.tensor([0, 2]), torch.tensor([2, 2])  # one group of two sharing two slots
            for members, splits in ((16, 4), (2, 1)):  # the prefix workload's groups; 1 + 1 splits
                kv_pool = (pool, pool.clone(), table, rows, lens, groups, starts, members, dim**-0.5)
                shared_prefix_decode(q, *kv_pool, prefix_splits=splits, suffix_splits=splits)


def _layers():
    from scheduler_proc.layers.fp8_quant_kernel import quantize_rows, rmsnorm_quantize, silu_mul_quantize
    from scheduler_proc.layers.fused_moe import fused_experts
    from scheduler_proc.layers.qk_norm_rope import qk_norm_rope
    from scheduler_proc.layers.triton_linear import LinearConfig, triton_linear

    for cols in (896, 4096, 14_336, 20_000):  # one block (4 and 8 warps), and the two-pass loop
        quantize_rows(torch.zeros(3, cols, dtype=torch.bfloat16))
        silu_mul_quantize(torch.zeros(3, 2 * cols, dtype=torch.bfloat16))  # one block (4, 8, 16 warps), two passes
    for cols in (896, 4096):  # the norm's fused add, or none (the first layer)
        x = torch.zeros(3, cols, dtype=torch.bfloat16)
        rmsnorm_quantize(x, torch.ones(cols, dtype=torch.bfloat16), 1e-6, x.clone())
        rmsnorm_quantize(x, torch.ones(cols, dtype=torch.bfloat16), 1e-6)
    for heads, kv_heads, dim in ((16, 8, 128), (32, 4, 128), (14, 2, 64)):
        qkv = torch.zeros(5, (heads + 2 * kv_heads) * dim, dtype=torch.bfloat16)
        q = qkv[:, : heads * dim].view(5, heads, dim)
        k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(5, kv_heads, dim)
        weight = torch.ones(dim, dtype=torch.bfloat16)
        qk_norm_rope(q, k, torch.arange(5), torch.zeros(64, dim), weight, weight, 1e-6)
    experts, hidden, inner = 8, 256, 128
    x = torch.zeros(6, hidden, dtype=torch.bfloat16)
    w13 = torch.zeros(experts, 2 * inner, hidden, dtype=torch.bfloat16)
    w2 = torch.zeros(experts, hidden, inner, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 3], [1, 2], [7, 0], [5, 6], [2, 4], [3, 1]])
    fused_experts(x, w13, w2, torch.full((6, 2), 0.5), ids)
    x = torch.zeros(256, 896, dtype=torch.bfloat16)
    weight, bias = torch.zeros(1152, 896, dtype=torch.bfloat16), torch.zeros(1152, dtype=torch.bfloat16)
    for config in (None, LinearConfig(128, 128, 64, num_warps=8, num_stages=4), LinearConfig(split_k=4)):
        triton_linear(x, weight, bias, config)
    fp8 = torch.float8_e4m3fn  # FP8 operands with their scales, bf16 out (the FP8 layers' GEMM)
    x_q, w_q = x.to(fp8), weight.to(fp8)
    scales = (torch.ones(256, 1), torch.ones(1152))
    for config in (LinearConfig(64, 64, 128), LinearConfig(64, 128, 128, split_k=2)):
        triton_linear(x_q, w_q, None, config, scales=scales, out_dtype=torch.bfloat16)


def main() -> int:
    driver.set_active(_Sm90())
    JITFunction.run = _compile_only(JITFunction.run)
    for part in (_sampling, _attention, _layers):
        part()
    print("\n".join(f"compiled {name}" for name in _compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
