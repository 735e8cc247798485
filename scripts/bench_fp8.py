"""FP8 on an H200 (issue 21), in parts that each fit one device call (~8 minutes); each prints a table and
appends JSON lines to <out>/fp8.jsonl (engine throughput runs: <out>/bench.jsonl, via engine/bench.py).
All models have random weights (`--load-format dummy`), quantized to FP8 as they load where asked.

  check        Qwen3-0.6B and Llama-3.1-8B: greedy top-1 agreement of fp8 weights, and of fp8 weights + an
               FP8 KV cache, with bf16 over 1,024 teacher-forced positions, at positions where bf16's
               top-2 logprob gap is > 0.1, 0.5, 1.0 (target >= 0.99 at 0.1), beside bf16 vs float32;
               peak memory and KV pool tokens of each
  qwen3-0.6b   throughput of bf16 / fp8 / fp8 + fp8 KV on decode-heavy and nanovllm, with --roofline
  llama-3.1-8b the same (target: fp8 >= 1.4x bf16 on decode-heavy)
  70b          Llama-3.1-70B, FP8 weights on ONE H200: serves decode-heavy, with its throughput and
               fraction of the (FP8) floor; 70b-fp8kv: the same with an FP8 KV cache

Run on the device: bash scripts/device_run.sh python3 scripts/bench_fp8.py <part> --out $OUT
(then copy $OUT/fp8.jsonl and $OUT/bench.jsonl under docs/bench/).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine import bench_tools  # noqa: E402

MODELS = {name: os.path.join(ROOT, "configs", name) for name in ("qwen3-0.6b", "llama-3.1-8b", "llama-3.1-70b")}
VARIANTS = {
    "bf16": [],
    "fp8": ["--quantization", "fp8"],
    "fp8+fp8kv": ["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"],
}
GAPS = (0.1, 0.5, 1.0)  # bf16 top-2 logprob gaps above which agreement is counted


def record(out: str, row: dict[str, Any]) -> None:
    bench_tools.record(os.path.join(out, "fp8.jsonl"), row)


def scores(model: str, settings: dict[str, Any], prompts: list[list[int]]) -> tuple[list[tuple], dict]:
    """(top-1 id, top-1 logprob, top-2 logprob) at every prompt position after the first, and server info."""
    from engine import Engine

    with Engine(
        model,
        load_format="dummy",
        context_length=4096,
        max_running_requests=8,
        disable_cuda_graph=True,  # prefill only: no decode to capture, a faster start
        log_level="warning",
        **settings,
    ) as engine:
        outputs = engine.generate(
            input_ids=prompts,
            sampling_params={"max_new_tokens": 1, "temperature": 0},
            return_logprob=True,
            logprob_start_len=0,
            top_logprobs_num=2,
        )
        info = engine.get_server_info()
    rows = [(t[0][1], t[0][0], t[1][0]) for out in outputs for t in out["meta_info"]["input_top_logprobs"][1:]]
    return rows, info


def agreement(out: str, name: str) -> None:
    """Top-1 agreement with bf16 of each FP8 variant, at positions whose bf16 top-2 gap exceeds each of
    GAPS, beside bf16's own agreement with float32 (the bar: how often mere bf16 rounding flips them).
    Random weights give flat logits (many near-ties): on CPU, Qwen3-0.6B float32 vs fp8 weights agreed
    at 83% of gap > 0.1 positions; the issue's 99% is meant for trained weights."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(257)] for _ in range(4)]
    runs = {
        "bf16": {},
        "fp32": {"dtype": "float32", "attention_backend": "torch"},
        "fp8": {"quantization": "fp8"},
        "fp8+fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"},
    }
    results = {variant: scores(MODELS[name], settings, prompts) for variant, settings in runs.items()}
    bf16 = results["bf16"][0]
    row: dict[str, Any] = {"part": "agreement", "model": name, "positions": len(bf16)}
    for variant, (tops, info) in results.items():
        row[f"{variant}_peak_gpu_gib"] = info.get("peak_gpu_memory_bytes", 0) / 2**30
        row[f"{variant}_kv_pool_tokens"] = info.get("kv_pool_tokens")
        if variant == "bf16":
            continue
        for gap in GAPS:
            clear = [i for i, (_, first, second) in enumerate(bf16) if first - second > gap]
            row[f"positions_gap>{gap}"] = len(clear)
            row[f"{variant}_top1_gap>{gap}"] = sum(tops[i][0] == bf16[i][0] for i in clear) / max(1, len(clear))
    row["target"] = ">= 0.99 fp8 top1 at gap > 0.1 (trained weights)"
    record(out, row)


def throughput(out: str, name: str, variant: str, workload: str, extra: list[str], timeout: int) -> None:
    flags = ["--model-path", MODELS[name], "--load-format", "dummy", "--context-length", "4096"]
    flags += ["--workload", workload, "--roofline", *VARIANTS[variant], *extra]
    bench_tools.run_harness(flags, f"fp8-bench {name} {variant}", os.path.join(out, "bench.jsonl"), timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["check", "qwen3-0.6b", "llama-3.1-8b", "70b", "70b-fp8kv"])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--workloads", default="decode-heavy,nanovllm", help="comma-separated, for the throughput parts")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, in the order to run them")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.part == "check":
        for name in ("qwen3-0.6b", "llama-3.1-8b"):
            agreement(args.out, name)
    elif args.part in ("70b", "70b-fp8kv"):  # ~70 GB of FP8 weights (bf16 embeddings, LM head) on one card
        variant = "fp8" if args.part == "70b" else "fp8+fp8kv"
        extra = ["--mem-fraction-static", "0.92", "--cuda-graph-max-bs", "256"]
        throughput(args.out, "llama-3.1-70b", variant, "decode-heavy", extra, timeout=540)
    else:
        for workload in args.workloads.split(","):
            for variant in args.variants.split(","):
                extra = ["--cuda-graph-max-bs", "512"] if workload == "decode-heavy" else []
                throughput(args.out, args.part, variant, workload, extra, timeout=200)


if __name__ == "__main__":
    main()
