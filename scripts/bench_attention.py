"""flashinfer attention kernels at the shapes of our benchmark steps, on the device: the prefill, mixed and
decode calls one step makes per layer, with each kernel choice, plus the host time of plan(); decode also
through flashinfer's prefill kernels (fa2, fa3: one query row per sequence) and through the Triton
candidate (scheduler_proc/attention/triton_decode.py), with its largest difference from flashinfer's output.

    python scripts/bench_attention.py [--heads 16 --kv-heads 8 --head-dim 128] [--kv-dtype fp8] [--out FILE]

Prints one line per case (device µs per layer call, median of 50; plan() host µs); --out appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import flashinfer
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}  # fp8: kv_cache_dtype="fp8_e4m3"


def _median_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def _layout(prefix: list[int], extend: list[int], page: int, num_pages: int):
    """(qo_indptr, kv_indptr, kv_indices, last_page_len) of sequences laid out in shuffled pages."""
    seq = [p + e for p, e in zip(prefix, extend)]
    pages_per = [(s + page - 1) // page for s in seq]
    order = list(range(1, num_pages))
    random.Random(0).shuffle(order)
    indices, at = [], 0
    for n in pages_per:
        indices += order[at : at + n]
        at += n
    qo = torch.tensor([0] + extend, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kv = torch.tensor([0] + pages_per, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    last = torch.tensor([s - (n - 1) * page for s, n in zip(seq, pages_per)], dtype=torch.int32)
    return qo, kv, torch.tensor(indices, dtype=torch.int32, device="cuda"), last


def run_case(name: str, prefix: list[int], extend: list[int], args, kind: str, page: int, backend: str) -> dict:
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    total_pages = (sum(p + e for p, e in zip(prefix, extend)) // page) + len(prefix) + 16
    kv_dtype = KV_DTYPES[args.kv_dtype]
    k = torch.randn(total_pages, page, hkv, d, dtype=torch.bfloat16, device="cuda").to(kv_dtype)
    v = torch.randn_like(k, dtype=torch.bfloat16).to(kv_dtype)
    qo, kv_indptr, indices, last = _layout(prefix, extend, page, total_pages)
    q = torch.randn(sum(extend), hq, d, dtype=torch.bfloat16, device="cuda")
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    if backend in ("fa2", "fa3"):  # decode too: one query row per sequence through the prefill kernels
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)

        def plan():
            wrapper.plan(
                qo,
                kv_indptr,
                indices,
                last,
                hq,
                hkv,
                d,
                page,
                causal=True,
                q_data_type=torch.bfloat16,
                kv_data_type=kv_dtype,
            )
    else:
        # Triton's reference on tensor cores: the CUDA-core decode has no group of 7 (Qwen2.5-0.5B's, lease K)
        tc = backend in ("tc", "triton")
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tc)

        def plan():
            wrapper.plan(kv_indptr, indices, last, hq, hkv, d, page, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)

    run, error = (lambda: wrapper.run(q, (k, v))), None
    if backend == "triton":  # scheduler_proc/attention/triton_decode.py, checked against flashinfer's output
        plan()
        run, error = _triton_decode(q, k, v, kv_indptr, indices, wrapper.run(q, (k, v)))
        plan = _nothing  # the kernel reads the slot lists as they are
    plan_us = _plan_us(plan)
    us = _median_us(run)
    kv_bytes = 2 * sum(p + e for p, e in zip(prefix, extend)) * hkv * d * k.element_size()
    row = {
        "case": name,
        "kind": kind,
        "page": page,
        "backend": backend,
        "kernel_us": us,
        "plan_us": plan_us,
        "kv_GBps": kv_bytes / us / 1e3,
        "heads": [hq, hkv, d],
        "kv_dtype": args.kv_dtype,
        "max_abs_error_vs_flashinfer": error,
    }
    print(
        f"{name:<28}{kind:<8}{backend:<7}{args.kv_dtype:<5}page {page:<4}{us:>9.1f} us  plan {plan_us:>7.1f} us  "
        f"KV read {row['kv_GBps']:>6.0f} GB/s"
        + (f"  max |diff| vs flashinfer {error:.2e}" if error is not None else "")
    )
    return row


# (BLOCK_N, warps, stages). One stage keeps K and V tiles out of shared memory (more programs on an SM: lease K's
# best tilings used two stages, whose double buffers hold 64 KB of each program's).
_TRITON_TILINGS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 2), (128, 8, 3), (64, 4, 1), (128, 8, 1)]
_TRITON_SPLITS = (2, 4, 8)


def _plan_us(plan) -> float:
    """Host µs of one plan() (mean of 20, after one untimed)."""
    plan()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        plan()
    plan_us = (time.perf_counter() - start) / 20 * 1e6
    torch.cuda.synchronize()
    return plan_us


def _triton_decode(q, k, v, kv_indptr, indices, reference):
    """The Triton decode kernel over the same page-size-1 pool, in its fastest tiling here: (its call, its
    largest difference from flashinfer's output). Each tiling's time is printed. The kernel reads a
    request-to-token table (as the pool's req_to_token): one row per sequence, holding its slots."""
    from scheduler_proc.attention.triton_decode import decode_attention

    pool_k, pool_v = k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
    lens = (kv_indptr[1:] - kv_indptr[:-1]).tolist()
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32, device=q.device)
    for b, (start, n) in enumerate(zip(kv_indptr[:-1].tolist(), lens)):
        table[b, :n] = indices[start : start + n]
    rows = torch.arange(len(lens), device=q.device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=q.device)

    def call(block_n: int, warps: int, stages: int, splits=None, **variant):
        tiling = dict(block_n=block_n, num_warps=warps, num_stages=stages, splits=splits, **variant)
        return lambda: decode_attention(q, pool_k, pool_v, table, rows, seq_lens, q.shape[-1] ** -0.5, **tiling)

    timed = [(_median_us(call(*t)), t, call(*t)) for t in _TRITON_TILINGS]
    print("    triton tilings (BLOCK_N, warps, stages): " + ", ".join(f"{t}: {us:.1f} us" for us, t, _ in timed))
    best = min(timed, key=lambda x: x[0])[1]
    # The best tiling again with each sequence cut into more splits than the default's (which fills the SMs
    # by program count alone): slices the same length over the batch balance sequences of unequal lengths.
    split = [(_median_us(call(*best, n)), (*best, n), call(*best, n)) for n in _TRITON_SPLITS]
    print(f"    triton splits at {best}: " + ", ".join(f"{t[-1]}: {us:.1f} us" for us, t, _ in split))
    variants = {
        "longest sequences first (the engine's order)": dict(order=torch.argsort(seq_lens, descending=True)),
    }
    if pool_k.dtype == torch.float8_e4m3fn:
        variants["FP8 rows to bf16 instead of fp16"] = dict(fp8_in_f16=False)
    for name, variant in variants.items():
        print(f"    triton at {best}, {name}: {_median_us(call(*best, **variant)):.1f} us")
    run = min(timed + split, key=lambda x: x[0])[2]
    return run, (run().float() - reference.float()).abs().max().item()


def _nothing() -> None:
    pass


def _decode_layout(lengths: list[int], prompt: list[int], layout: str) -> list[list[int]]:
    """KV slots of each sequence: "contiguous" (one run each), "decode" (the prompt in one run, then one
    slot per step handed out to the batch in turn, as a token-granular pool does), "shuffled" (random)."""
    batch, slots, at = len(lengths), [], 1
    for n, p in zip(lengths, prompt):
        slots.append(list(range(at, at + (n if layout == "contiguous" else p))))
        at += n if layout == "contiguous" else p
    if layout != "contiguous":
        for step in range(max(n - p for n, p in zip(lengths, prompt))):
            for i in range(batch):
                if lengths[i] - prompt[i] > step:
                    slots[i].append(at + step * batch + i)
    if layout == "shuffled":
        flat = sorted(s for row in slots for s in row)
        perm = flat[:]
        random.Random(1).shuffle(perm)
        remap = dict(zip(flat, perm))
        slots = [[remap[s] for s in row] for row in slots]
    return slots


def run_layouts(args, pool_tokens: int) -> list[dict]:
    """Decode at nanovllm-like lengths (half prompt, half generated) over a pool of pool_tokens, each layout."""
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rng = random.Random(0)
    prompt = [rng.randint(100, 1024) for _ in range(256)]
    lengths = [p + rng.randint(0, 600) for p in prompt]
    kv_dtype = KV_DTYPES[args.kv_dtype]
    k = torch.randn(pool_tokens, 1, hkv, d, dtype=torch.bfloat16, device="cuda").to(kv_dtype)
    v = torch.randn_like(k, dtype=torch.bfloat16).to(kv_dtype)
    q = torch.randn(len(lengths), hq, d, dtype=torch.bfloat16, device="cuda")
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    for tc in (False, True):
        for layout in ("contiguous", "decode", "shuffled"):
            slots = _decode_layout(lengths, prompt, layout)
            indptr = torch.tensor([0] + [len(s) for s in slots], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            indices = torch.tensor([x for s in slots for x in s], dtype=torch.int32, device="cuda")
            last = torch.ones(len(slots), dtype=torch.int32)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tc)
            wrapper.plan(indptr, indices, last, hq, hkv, d, 1, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
            us = _median_us(lambda w=wrapper: w.run(q, (k, v)))
            gbps = 2 * sum(lengths) * hkv * d * k.element_size() / us / 1e3
            kind = "tc" if tc else "cuda"
            print(f"layout {layout:<11} {kind:<5} pool {pool_tokens:>8} {us:>8.1f} us  {gbps:>6.0f} GB/s")
            rows.append(
                {
                    "case": f"layout {layout}",
                    "tc": tc,
                    "pool_tokens": pool_tokens,
                    "kernel_us": us,
                    "kv_GBps": gbps,
                    "heads": [hq, hkv, d],
                }
            )
    return rows


def attention_args() -> argparse.ArgumentParser:
    """The heads, KV dtype and output file every attention benchmark takes (bench_triton_decode.py too)."""
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-dtype", default="bf16", choices=sorted(KV_DTYPES), help="the KV cache's element type")
    p.add_argument("--out", default=None)
    return p


def main() -> None:
    p = attention_args()
    p.add_argument("--layouts", type=int, default=0, help="pool tokens: time decode over KV slot layouts only")
    p.add_argument("--backends", default="cuda,tc,fa2,fa3,triton", help="those timed (decode: all; prefill: fa2, fa3)")
    args = p.parse_args()
    if args.layouts:
        rows = run_layouts(args, args.layouts)
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return
    rng = random.Random(0)
    nano = [rng.randint(100, 1024) + rng.randint(0, 512) for _ in range(256)]
    cases = [
        ("prefill 16x512", [0] * 16, [512] * 16, "prefill"),
        ("prefill 8x1024", [0] * 8, [1024] * 8, "prefill"),
        ("mixed 16x512 + 240 dec@600", [0] * 16 + [600] * 240, [512] * 16 + [1] * 240, "prefill"),
        ("decode 256@640", [639] * 256, [1] * 256, "decode"),
        ("decode 256@nanovllm", [n - 1 for n in nano], [1] * 256, "decode"),
        ("decode 512@1100", [1099] * 512, [1] * 512, "decode"),
    ]
    rows = []
    for name, prefix, extend, kind in cases:
        # fa3 takes q and KV of one dtype: over an FP8 cache (bf16 q) it cannot be built (nvcc fails after a minute)
        prefill = ("fa2",) if args.kv_dtype == "fp8" else ("fa2", "fa3")
        backends = prefill if kind == "prefill" else ("cuda", "tc", *prefill, "triton")
        pages = (1,) if kind == "prefill" else (1, 16)
        for backend in (b for b in backends if b in args.backends.split(",")):
            for page in pages if backend != "triton" else (1,):  # the Triton kernel reads token slots
                try:
                    rows.append(run_case(name, prefix, extend, args, kind, page, backend))
                except Exception as exc:  # a kernel flashinfer cannot build here: say so, go on
                    print(f"{name:<28}{kind:<8}{backend:<7}page {page:<4} failed: {type(exc).__name__}: {exc}")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
