"""Prefill logits of ferry against HF transformers on the same random weights, per prompt, with the
bf16 noise floor beside them (HF bf16 vs HF float32). Run on the device: python scripts/gpu_parity.py."""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from gpu_reference import hf_copy, peak_lm_head, prefill_logits, runner_for  # noqa: E402


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> str:
    rel = ((a - b).norm() / b.norm()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return f"{name:<28} rel err {rel:.2e}  top-1 {agree:.2%}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="qwen2.5-0.5b")
    p.add_argument("--backend", default="flashinfer")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    runner = runner_for(args.config, disable_cuda_graph=True, attention_backend=args.backend, dtype=args.dtype)
    print(f"{args.config}: ferry {args.dtype} with the {args.backend} attention backend")
    peak_lm_head(runner)
    hf = hf_copy(runner)
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(n)] for n in (250, 250, 250, 260)]
    ours = prefill_logits(runner, prompts).float().split([len(x) for x in prompts])
    with torch.inference_mode():
        hf.to(torch.bfloat16)
        ref16 = [hf(torch.tensor([x], device="cuda")).logits[0].float() for x in prompts]
        hf.float()
        ref32 = [hf(torch.tensor([x], device="cuda")).logits[0].float() for x in prompts]
    for i in range(len(prompts)):
        print(f"prompt {i} ({len(prompts[i])} tokens)")
        print("  " + compare("ferry vs HF bf16", ours[i], ref16[i]))
        print("  " + compare("ferry vs HF fp32", ours[i], ref32[i]))
        print("  " + compare("HF bf16 vs HF fp32", ref16[i], ref32[i]))
        first = ours[i][:16]
        print("  " + compare("first 16 positions vs fp32", first, ref32[i][:16]))


if __name__ == "__main__":
    main()
