"""ferry against HF transformers `generate` on this CPU: the same 16 prompts, 64 new tokens each,
greedy, never stopping early; `--runs` timed runs of each (one engine, one HF model), each run's wall time
and the machine's load average when it started, and the medians. Prints a table and, with --result-file,
appends one JSON line.

    .venv/bin/python scripts/bench_cpu.py [--runs 5] [--model-path DIR] [--result-file bench.jsonl] [--tag TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
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


def run_ferry(model_path: Optional[str], runs: int) -> list[dict[str, float]]:
    """Per run: wall seconds of one batch generate call, output tokens, load average; start-up is not timed."""
    from engine import Engine

    with Engine(model_path=model_path, device="cpu", log_level="warning") as llm:
        llm.generate(PROMPTS[0], {"max_new_tokens": 2})  # warm-up: first-call costs are not throughput
        params = {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}

        def tokens() -> int:
            return sum(o["meta_info"]["completion_tokens"] for o in llm.generate(PROMPTS, params))

        return [_timed(tokens) for _ in range(runs)]


def _timed(run: Callable[[], int]) -> dict[str, float]:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    tokens = run()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall, "load_1min": load}


def run_hf(model_path: str, runs: int) -> list[dict[str, float]]:
    """Per run: wall seconds of one padded-batch generate call, output tokens, load average; float32, left
    padding."""
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
        prompt_len = batch["input_ids"].shape[1]

        def tokens() -> int:
            return (model.generate(**batch, **settings).shape[1] - prompt_len) * len(PROMPTS)

        return [_timed(tokens) for _ in range(runs)]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: ferry's default model")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each; the medians are reported")
    parser.add_argument("--result-file", default=None, help="append the result as one JSON line")
    parser.add_argument("--tag", default="", help="free text stored in the JSON line")
    args = parser.parse_args(argv)

    import torch

    from engine.shared.model_files import resolve_model_path

    model_path = resolve_model_path(args.model_path)
    ferry, hf = run_ferry(model_path, args.runs), run_hf(model_path, args.runs)
    result = {
        "bench": "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": model_path,
        "num_prompts": len(PROMPTS),
        "max_new_tokens": MAX_NEW_TOKENS,
        "torch_threads": torch.get_num_threads(),
        "ferry": _median(ferry) | {"runs": ferry},
        "hf": _median(hf) | {"runs": hf},
        "tag": args.tag,
    }
    result["ratio"] = result["ferry"]["output_tok_s"] / result["hf"]["output_tok_s"]
    print(f"{'':8}{'run':>5}{'load':>7}{'out tokens':>12}{'wall s':>10}{'out tok/s':>12}")
    for name, runs in (("ferry", ferry), ("hf", hf)):
        for i, r in enumerate(runs, 1):
            print(
                f"{name:8}{i:>5}{r['load_1min']:>7.1f}{r['output_tokens']:>12}{r['wall_s']:>10.2f}{r['output_tok_s']:>12.1f}"
            )
    print(
        f"medians: ferry {result['ferry']['output_tok_s']:.1f}, hf {result['hf']['output_tok_s']:.1f} out tok/s; "
        f"ferry / hf: {result['ratio']:.2f}x"
    )
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run of median wall time."""
    return dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])


if __name__ == "__main__":
    main()
