"""Sampling one token per row on the device: the torch sampler's passes against the fused Triton kernel.

    python scripts/bench_sampling.py [--rows 256] [--vocab 151936]

Prints µs per call (median of 50, CUDA events) and how often the two draws agree (they differ only within
rounding of a CDF boundary).
"""

from __future__ import annotations

import argparse

import torch

from scheduler_proc.fused_sample import fused_sample


def _median_us(fn, reps: int = 50) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def torch_path(logits_bf16: torch.Tensor, rows: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor):
    """What a step did before: float32 logits, the sampled rows gathered, then divide, softmax, cumsum, search."""
    logits = logits_bf16.float()[rows]
    greedy = temperature == 0.0
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args()
    logits = (torch.randn(args.rows, args.vocab, device="cuda") * 2).to(torch.bfloat16)
    rows = torch.arange(args.rows, device="cuda")
    uniform = torch.rand(args.rows, device="cuda")
    for t in (0.6, 0.0):
        temperature = torch.full((args.rows,), t, device="cuda")
        agree = torch_path(logits, rows, temperature, uniform) == fused_sample(logits, rows, temperature, uniform)
        old = _median_us(lambda t=temperature: torch_path(logits, rows, t, uniform))
        new = _median_us(lambda t=temperature: fused_sample(logits, rows, t, uniform))
        print(
            f"rows {args.rows} vocab {args.vocab} T={t}: torch {old:8.1f} us  fused {new:8.1f} us  "
            f"agree {agree.float().mean().item():.2%}"
        )


if __name__ == "__main__":
    main()
