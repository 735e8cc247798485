"""The Triton decode kernels on the device, each call timed in a CUDA graph of 20 as the engine runs them (timed
one call at a time, a 35 us kernel measures the host's launch instead), over the engine's KV layout: each
prompt's slots in one run, then one slot per step handed out across the batch.

    python scripts/bench_triton_decode.py [--heads 16 --kv-heads 8 --head-dim 128] [--kv-dtype fp8] [--out FILE]
        the tilings and splits of triton_decode.py at nanovllm-like lengths (batch 256), 256 x 640, 512 x 1,100
    python scripts/bench_triton_decode.py --products [--kv-dtype fp8] [...]
        the products' orders (kv_first), rows (group_rows) and, over an FP8 pool, operands (fp8_products) at
        a few tilings
    python scripts/bench_triton_decode.py --cascade [...]
        the `prefix` workload's decode (64 groups of 16 sequences sharing 1,024 slots) through triton_decode.py,
        which reads each shared slot once per sequence, and shared_prefix_decode.py, once per group

Prints one line per case (device us per layer call); --out appends JSON lines.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench_attention import KV_DTYPES, _decode_layout, attention_args  # noqa: E402 (this script's folder, as the script runs)

from engine.bench_tools import graph_us  # noqa: E402

# (BLOCK_N, warps, stages); splits None: the kernel's default.
_SWEEP_TILINGS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)]
# An FP8 row is half as many bytes: longer blocks and deeper pipelines fit the same shared memory.
_FP8_TILINGS = [(128, 4, 3), (128, 8, 3), (256, 8, 2)]


def _cases(fp8: bool, products: bool) -> list[tuple]:
    """(tiling, splits, kv_first, fp8_products, group_rows) to time: tilings by splits, and the KV block as
    first operand at the default splits; with products, each tiling with the query or the KV block first,
    KV-first also with 8 query rows a product (wgmma's least) instead of 16, and over an FP8 pool with no
    product, the scores' or (KV-first) both on FP8 operands."""
    if products:
        tilings = [(64, 4, 3), (128, 4, 3), (128, 4, 4)] + ([] if fp8 else [(64, 8, 3)])
        fp8_products = (0, 1, 2) if fp8 else (0,)
        kinds = [(False, 16, n) for n in fp8_products[:2]]
        kinds += [(True, rows, n) for rows in (16, 8) for n in fp8_products]
        return [(t, None, first, n, rows) for t in tilings for first, rows, n in kinds]
    tilings = _SWEEP_TILINGS + (_FP8_TILINGS if fp8 else [])
    cases = [(t, splits, False, 0, 16) for t in tilings for splits in (None, 1, 4, 8)]
    return cases + [(t, None, True, 0, 16) for t in tilings]  # the KV block as first operand, default splits


def sweep(args) -> list[dict]:
    """The Triton decode kernel's tilings and splits at a running engine's KV layout (each prompt's slots in
    one run, then one slot per step handed out across the batch), timed in CUDA graphs as the engine runs it:
    nanovllm-like lengths at batch 256, and 512 sequences of 1,100 (decode-heavy)."""
    from scheduler_proc.attention.triton_decode import decode_attention

    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rng = random.Random(0)
    prompts = [rng.randint(100, 1024) for _ in range(256)]
    shapes = {
        "256@nanovllm": (prompts, [p + rng.randint(0, 600) for p in prompts]),
        "256@640": ([600] * 256, [640] * 256),
        "512@1100": ([128] * 512, [1100] * 512),
    }
    rows = []
    for name, (prompt, lengths) in shapes.items():
        slots = _decode_layout(lengths, prompt, "decode")
        pool_tokens = max(max(s) for s in slots) + 1
        k = torch.randn(pool_tokens, hkv, d, dtype=torch.bfloat16, device="cuda").to(KV_DTYPES[args.kv_dtype])
        v = torch.randn_like(k, dtype=torch.bfloat16).to(k.dtype)
        table = torch.zeros(len(slots), max(lengths), dtype=torch.int32, device="cuda")
        for b, row in enumerate(slots):
            table[b, : len(row)] = torch.tensor(row, dtype=torch.int32)
        seq_lens = torch.tensor(lengths, device="cuda")
        req_rows, q = torch.arange(len(lengths), device="cuda"), torch.randn(len(lengths), hq, d, device="cuda")
        q = q.to(torch.bfloat16)
        order = torch.sort(seq_lens, descending=True, stable=True).indices
        kv_bytes, fp8 = 2 * sum(lengths) * hkv * d * k.element_size(), k.element_size() == 1
        for (block_n, warps, stages), splits, kv_first, fp8_products, group_rows in _cases(fp8, args.products):
            tiling = dict(block_n=block_n, num_warps=warps, num_stages=stages, splits=splits, kv_first=kv_first)
            tiling.update(fp8_products=fp8_products, group_rows=group_rows)
            call = functools.partial(decode_attention, q, k, v, table, req_rows, seq_lens, d**-0.5, order=order)
            us = graph_us(functools.partial(call, **tiling))
            gbps = kv_bytes / us / 1e3
            rows.append({"case": f"triton sweep {name}", "heads": [hq, hkv, d], "kernel_us": us, "kv_GBps": gbps})
            rows[-1].update(tiling)
            first = ("kv_first" if kv_first else "") + f" fp8 {fp8_products} {group_rows} rows"
            tiles = str((block_n, warps, stages))
            print(f"{name:<14} {tiles:<14} splits {splits!s:<5} {first:<27} {us:8.1f} us {gbps:6.0f} GB/s")
    return rows


def cascade(args) -> list[dict]:
    """The `prefix` workload's decode (64 groups of 16 sequences sharing 1,024 slots, each with its own 128
    prompt tokens and 64 generated) through triton_decode, which reads each shared slot once per sequence,
    and through shared_prefix_decode, which reads it once per group; CUDA graphs, engine KV layout."""
    from scheduler_proc.attention.shared_prefix_decode import shared_prefix_decode
    from scheduler_proc.attention.triton_decode import decode_attention

    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    groups, members, shared, tail = 64, 16, 1024, 192
    batch = groups * members
    # Prefixes first, each in one run (prefilled once); then the tails: prompts in runs, generated tokens
    # handed out one per step across the batch.
    table = torch.zeros(batch, shared + tail, dtype=torch.int32)
    at = 1
    for g in range(groups):
        table[g * members : (g + 1) * members, :shared] = torch.arange(at, at + shared, dtype=torch.int32)
        at += shared
    for b in range(batch):
        table[b, shared : shared + 128] = torch.arange(at, at + 128, dtype=torch.int32)
        at += 128
    generated = torch.arange(at, at + batch * (tail - 128), dtype=torch.int32).view(tail - 128, batch).t()
    table[:, shared + 128 :] = generated
    table = table.cuda()
    pool_tokens = at + batch * (tail - 128)
    kv_dtype = KV_DTYPES[args.kv_dtype]
    k = torch.randn(pool_tokens, hkv, d, dtype=torch.bfloat16, device="cuda").to(kv_dtype)
    v = torch.randn_like(k, dtype=torch.bfloat16).to(kv_dtype)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(batch, device="cuda")
    seq_lens = torch.full((batch,), shared + tail, device="cuda")
    group_ptr = torch.arange(0, batch + 1, members, device="cuda")
    starts = torch.full((batch,), shared, device="cuda")
    flat = functools.partial(decode_attention, q, k, v, table, rows, seq_lens, d**-0.5)
    flat_us = graph_us(flat)
    kv_bytes = 2 * batch * (shared + tail) * hkv * d * k.element_size()
    print(f"triton_decode (every sequence reads its prefix) {flat_us:8.1f} us  {kv_bytes / flat_us / 1e3:6.0f} GB/s")
    rows_out = [{"case": "cascade: triton_decode", "heads": [hq, hkv, d], "kernel_us": flat_us}]
    reference = flat().float()
    for block_n, warps in ((64, 4), (64, 8), (128, 8)):
        for prefix_splits in (None, 2, 8):
            tiling = dict(block_n=block_n, num_warps=warps, prefix_splits=prefix_splits)
            call = functools.partial(
                shared_prefix_decode, q, k, v, table, rows, seq_lens, group_ptr, starts, members, d**-0.5, **tiling
            )
            us = graph_us(call)
            error = (call().float() - reference).abs().max().item()
            print(f"shared_prefix_decode {tiling}: {us:8.1f} us ({flat_us / us:.2f}x)  max |diff| {error:.2e}")
            rows_out.append({"case": "cascade: shared_prefix_decode", "heads": [hq, hkv, d], "kernel_us": us, **tiling})
    return rows_out


def main() -> None:
    p = attention_args()
    p.add_argument("--cascade", action="store_true", help="the prefix workload's decode, shared prefix or not")
    p.add_argument("--products", action="store_true", help="kv_first x group_rows (x fp8_products) at a few tilings")
    args = p.parse_args()
    rows = cascade(args) if args.cascade else sweep(args)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
