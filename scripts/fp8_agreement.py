"""FP8's numerics on trained weights (issue 21's agreement bar), on the CPU: the default model (SmolLM2-135M-
Instruct, trained; the device's models have random weights, whose flat logits make most positions near-ties, and
trained weights cannot travel to it), teacher-forced over this repository's docs, in bf16 and with ferry's FP8
scheme applied to every linear layer but the LM head: weights quantized per output channel and activations per
token with ferry's own functions (scheduler_proc/layers/fp8.py), multiplied in float32 and rounded to bf16, as
torch._scaled_mm does on the device. Prints greedy top-1 agreement with bf16 at positions whose bf16 top-2
logprob gap exceeds 0.1, 0.5 and 1.0 (the bar: >= 99% at 0.1), beside float32's agreement with bf16.

    python scripts/fp8_agreement.py [--positions 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.shared.model_files import resolve_model_path  # noqa: E402
from scheduler_proc.layers.fp8 import dequantize, quantize_per_channel, quantize_per_token  # noqa: E402

GAPS = (0.1, 0.5, 1.0)
CHUNK = 256  # tokens a teacher-forced sequence


class Fp8Linear(nn.Module):
    """A linear layer as ferry's FP8 matmul computes it: e4m3 weight (per-row scale), e4m3 input (per-token
    scale), products summed in float32, the output rounded to the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_per_channel(linear.weight.detach().float())
        self.weight = dequantize(q, scale, torch.float32)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
        out = (x_q.float() * x_scale) @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], -1)


def to_fp8(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and f"{name}.{child_name}".lstrip(".") != "lm_head":
                setattr(module, child_name, Fp8Linear(child))
    return model


def token_chunks(tokenizer, positions: int) -> torch.Tensor:
    """[n, CHUNK] token ids of the docs' text, enough for `positions` predictions."""
    text = "\n\n".join(open(path).read() for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
    ids = tokenizer(text)["input_ids"]
    n = min(len(ids) // CHUNK, -(-positions // (CHUNK - 1)))
    return torch.tensor(ids[: n * CHUNK]).view(n, CHUNK)


@torch.inference_mode()
def top2(model: nn.Module, chunks: torch.Tensor) -> torch.Tensor:
    """[positions, 3]: top-1 id, top-1 and top-2 logprob at every position but each chunk's last."""
    rows = []
    for chunk in chunks:
        logprobs = model(chunk[None]).logits[0, :-1].float().log_softmax(-1)
        values, ids = logprobs.topk(2, dim=-1)
        rows.append(torch.stack([ids[:, 0].float(), values[:, 0], values[:, 1]], dim=-1))
    return torch.cat(rows)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--out", help="append the JSON line here")
    args = p.parse_args()
    path = resolve_model_path(None)
    chunks = token_chunks(AutoTokenizer.from_pretrained(path), args.positions)
    load = AutoModelForCausalLM.from_pretrained
    reference = top2(load(path, dtype=torch.bfloat16).eval(), chunks)
    variants = {
        "float32": top2(load(path, dtype=torch.float32).eval(), chunks),
        "fp8": top2(to_fp8(load(path, dtype=torch.bfloat16).eval()), chunks),
    }
    row = {"part": "agreement (trained weights, CPU)", "model": os.path.basename(path), "positions": len(reference)}
    gap = reference[:, 1] - reference[:, 2]
    for threshold in GAPS:
        clear = gap > threshold
        row[f"positions_gap>{threshold}"] = int(clear.sum())
        for name, tops in variants.items():
            agree = (tops[clear, 0] == reference[clear, 0]).float().mean().item()
            row[f"{name}_top1_gap>{threshold}"] = agree
            print(f"{name:<8} vs bf16, gap > {threshold}: {agree:.2%} of {int(clear.sum())} positions")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
