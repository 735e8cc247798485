"""Data parallelism's throughput (issue 22): the same workload through Engine(dp_size=1) and
Engine(dp_size=N), each a run of scripts/bench_offline_throughput.py in its own process; prints both rows
and their ratio (target: >= 1.8 at dp_size=2 on Qwen2.5-0.5B nanovllm, two GPUs).

  python scripts/bench_dp.py --result-file docs/bench/<date>-h200x2-dp.jsonl      # on a 2-GPU machine
  python scripts/bench_dp.py --device cpu --num-prompts 16 --model-path <tiny>    # a smoke run anywhere

Each engine run appends its own JSON line to --result-file (as the throughput benchmark does), then one
summary line {"part": "dp-throughput", ...} with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

from engine.bench_tools import run_harness  # noqa: E402


def run(dp_size: int, args: argparse.Namespace, result_file: str) -> dict:
    """One throughput run at dp_size; its JSON line (also appended to result_file)."""
    flags = ["--model-path", args.model_path]
    flags += ["--workload", args.workload] if args.workload else ["--num-prompts", str(args.num_prompts)]
    flags += ["--load-format", "dummy", "--dp-size", str(dp_size), "--device", args.device, *args.extra]
    row = run_harness(flags, f"dp{dp_size}", result_file, args.timeout)
    if row is None:
        raise SystemExit(f"the dp_size={dp_size} run failed")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=os.path.join(ROOT, "configs/qwen2.5-0.5b"))
    p.add_argument("--workload", default="nanovllm", help="a named workload; '' for --num-prompts random ones")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=int, default=400, help="seconds per engine run")
    p.add_argument("--result-file", default="")
    p.add_argument("extra", nargs="*", help="more flags for the throughput benchmark (after --)")
    args = p.parse_args()
    rows = {dp: run(dp, args, args.result_file)["ferry"] for dp in (1, args.dp_size)}
    one, many = rows[1], rows[args.dp_size]
    summary = {
        "part": "dp-throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_path": args.model_path,
        "workload": args.workload or f"{args.num_prompts} random",
        "device": one.get("device"),
        "dp1_output_tok_s": one["output_tok_s"],
        f"dp{args.dp_size}_output_tok_s": many["output_tok_s"],
        "ratio": many["output_tok_s"] / one["output_tok_s"],
        "target": ">= 1.8 at dp_size=2 (two GPUs)",
    }
    print(f"\n{'dp_size':>8} {'output tok/s':>14} {'total tok/s':>13} {'wall s':>8}")
    for dp, row in rows.items():
        print(f"{dp:>8} {row['output_tok_s']:>14.1f} {row['total_tok_s']:>13.1f} {row['wall_s']:>8.2f}")
    print(f"ratio {summary['ratio']:.2f} (target {summary['target']})")
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
