"""ferry against HF transformers `generate` on this CPU: the same 16 prompts, 64 new tokens each,
greedy, never stopping early; one timed run each. Prints a table and, with --result-file, appends
one JSON line.

    .venv/bin/python scripts/bench_cpu.py [--model-path DIR] [--result-file bench.jsonl] [--tag TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "List three colors: red,",
    "In 1969, the first person to walk on the moon was",
    "Translate to French: good morning",
    "Explain in simple words why the sky is blue, as if to a ten year old child who keeps asking why.",
    "Q: What is 12 times 12?\nA:",
    "Once upon a time, in a land far away, there lived a",
    "The best way to learn a language is",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\n# Plot a sine wave\n",
    "My favourite food is",
    "Water boils at",
    "Here is a short list of tips for writing clear emails at work:\n1.",
    "Dear Sir or Madam,",
    "1, 2, 3, 4,",
]
MAX_NEW_TOKENS = 64


def run_ferry(model_path: Optional[str]) -> tuple[float, int]:
    """(wall seconds of one batch generate call, output tokens); start-up is not timed."""
    from engine import Engine

    with Engine(model_path=model_path, device="cpu") as llm:
        llm.generate(PROMPTS[0], {"max_new_tokens": 2})  # warm-up: first-call costs are not throughput
        params = {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
        start = time.perf_counter()
        outputs = llm.generate(PROMPTS, params)
        wall = time.perf_counter() - start
    return wall, sum(o["meta_info"]["completion_tokens"] for o in outputs)


def run_hf(model_path: str) -> tuple[float, int]:
    """(wall seconds of one padded-batch generate call, output tokens), float32, left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    settings = dict(
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
    )
    with torch.inference_mode():
        model.generate(
            **tokenizer(PROMPTS[:1], return_tensors="pt"), **{**settings, "max_new_tokens": 2, "min_new_tokens": 2}
        )
        start = time.perf_counter()
        out = model.generate(**batch, **settings)
        wall = time.perf_counter() - start
    return wall, (out.shape[1] - batch["input_ids"].shape[1]) * len(PROMPTS)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: ferry's default model")
    parser.add_argument("--result-file", default=None, help="append the result as one JSON line")
    parser.add_argument("--tag", default="", help="free text stored in the JSON line")
    args = parser.parse_args(argv)

    import torch

    from engine.shared.model_files import resolve_model_path

    model_path = resolve_model_path(args.model_path)
    ferry_wall, ferry_tokens = run_ferry(model_path)
    hf_wall, hf_tokens = run_hf(model_path)
    result = {
        "bench": "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": model_path,
        "num_prompts": len(PROMPTS),
        "max_new_tokens": MAX_NEW_TOKENS,
        "torch_threads": torch.get_num_threads(),
        "ferry": {"wall_s": ferry_wall, "output_tokens": ferry_tokens, "output_tok_s": ferry_tokens / ferry_wall},
        "hf": {"wall_s": hf_wall, "output_tokens": hf_tokens, "output_tok_s": hf_tokens / hf_wall},
        "tag": args.tag,
    }
    result["ratio"] = result["ferry"]["output_tok_s"] / result["hf"]["output_tok_s"]
    print(f"{'':8}{'requests':>10}{'out tokens':>12}{'wall s':>10}{'out tok/s':>12}")
    for name in ("ferry", "hf"):
        r = result[name]
        print(f"{name:8}{len(PROMPTS):>10}{r['output_tokens']:>12}{r['wall_s']:>10.2f}{r['output_tok_s']:>12.1f}")
    print(f"ferry / hf: {result['ratio']:.2f}x")
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
