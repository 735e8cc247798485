"""What structured output costs, on the device: for each model (random weights from configs/), the same
requests with a JSON schema and without, in one engine, with the grammar compiled ahead (cache warm).
Throughput from one generate() over all requests; time to first token from all of them streamed at once.
The issue's bar: json output tok/s >= 0.85x free, json TTFT p50 <= 1.10x free.

    python scripts/bench_structured.py --result-file docs/bench/<date>-<device>-structured.jsonl

(Qwen2.5-0.5B and Llama-3.1-8B by default; --model-path picks others.) Prints a table and appends one JSON
line per model with --result-file."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any, Optional

from engine.bench_workloads import random_ids

MODELS = ["configs/qwen2.5-0.5b", "configs/llama-3.1-8b"]
# Objects with strings and an open-ended array: random weights rarely close them, so most requests run to
# max_new_tokens in both modes, and the masks span strings (most tokens allowed) and structure (few).
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["id", "name", "active", "score", "tags"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", action="append", help="repeat for several; default: " + ", ".join(MODELS))
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode, alternating; the best counts")
    p.add_argument("--schema", help="a JSON Schema file (default: a built-in object with strings and an array)")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--cuda-graph-max-bs", type=int, default=256)
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=100_000,
        help="steps timed by the scheduler: each mode's decode step p50 (device, device idle before it, host)",
    )
    p.add_argument("--result-file", default=None)
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def run_model(model_path: str, args: argparse.Namespace, schema: dict[str, Any]) -> dict[str, Any]:
    from engine import Engine

    workload = random_ids(args.num_prompts, args.input_len, args.output_len, 1.0, seed=7)
    free = {"max_new_tokens": args.output_len, "temperature": args.temperature, "ignore_eos": True, "seed": 1}
    modes = {"free": free, "json": free | {"json_schema": json.dumps(schema)}}
    settings = {
        "load_format": "dummy",
        "context_length": args.context_length,
        "cuda_graph_max_bs": args.cuda_graph_max_bs,
        "disable_overlap_schedule": args.disable_overlap_schedule,
        "profile_steps": args.profile_steps,
    }
    with Engine(model_path, **settings) as engine:
        for params in modes.values():  # kernels warm, and the schema compiled: the grammar cache is warm
            engine.generate(input_ids=workload.input_ids[:8], sampling_params=params | {"max_new_tokens": 8})
        result: dict[str, Any] = {mode: {} for mode in modes}
        for _ in range(args.repeats):
            for mode, params in modes.items():
                figures = _throughput(engine, workload.input_ids, params)
                if figures["output_tok_s"] > result[mode].get("output_tok_s", 0.0):
                    result[mode].update(figures)
        for mode, params in modes.items():
            result[mode].update(_ttft(engine, workload.input_ids, params))
        info = engine.get_server_info()
    result["grammars_compiled"] = info.get("grammars_compiled")
    result["device"] = info.get("device_name")
    result["throughput_ratio"] = result["json"]["output_tok_s"] / result["free"]["output_tok_s"]
    result["ttft_p50_ratio"] = result["json"]["ttft_p50_s"] / result["free"]["ttft_p50_s"]
    return result


def _throughput(engine: Any, prompts: list[list[int]], params: dict[str, Any]) -> dict[str, Any]:
    from engine.bench import step_stats

    start = time.perf_counter()
    outputs = engine.generate(input_ids=prompts, sampling_params=params)
    wall = time.perf_counter() - start
    steps = step_stats(engine.get_server_info().get("step_profile"), start, start + wall)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    stopped = [o for o in outputs if o["meta_info"]["finish_reason"]["type"] == "stop"]
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "requests_per_s": len(outputs) / wall,
        "mean_output_len": tokens / len(outputs),
        "finished_by_grammar": len(stopped) if "json_schema" in params else 0,
        "valid_json_of_finished": sum(_is_json(o["text"]) for o in stopped) if "json_schema" in params else 0,
        **{key: value for key, value in steps.items() if key.startswith("step_")},
    }


def _ttft(engine: Any, prompts: list[list[int]], params: dict[str, Any]) -> dict[str, float]:
    """Every request streamed at once: seconds from its submission to its first chunk."""

    async def one(ids: list[int]) -> float:
        start = time.perf_counter()
        first = None
        async for _ in await engine.async_generate(input_ids=ids, sampling_params=params, stream=True):
            first = first if first is not None else time.perf_counter() - start
        return first if first is not None else float("nan")

    async def all_streams() -> list[float]:
        return await asyncio.gather(*(one(ids) for ids in prompts))

    start = time.perf_counter()
    ttft = sorted(asyncio.run(all_streams()))
    p50 = ttft[len(ttft) // 2]
    return {
        "ttft_p50_s": p50,
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "ttft_steps": _steps_until(engine.get_server_info().get("step_profile"), start, start + p50),
    }


def _steps_until(profile: Optional[dict[str, list]], since: float, until: float) -> list[list[float]]:
    """The steps queued from `since` until `until` (the median first token): for each, when it was queued (ms
    after `since`), its batch size, device ms and the device's idle ms before it: where a TTFT went."""
    if not profile:
        return []
    return [
        [round((clock - since) * 1e3, 1), size, round(gpu, 2), round(gap or 0.0, 2)]
        for clock, size, gpu, gap in zip(profile["clock"], profile["batch_size"], profile["gpu_ms"], profile["gap_ms"])
        if since <= clock <= until
    ]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _step_cell(r: dict[str, Any]) -> str:
    """Decode step p50 at full batch: device / idle before it / host ms (with --profile-steps)."""
    if "step_gpu_ms_p50" not in r:
        return ""
    return "/".join(f"{r.get(f'step_{key}_ms_p50') or 0:.2f}" for key in ("gpu", "gap", "host"))


def print_table(rows: list[dict[str, Any]]) -> None:
    header = ["model", "mode", "out tok/s", "req/s", "mean out", "TTFT p50 ms", "TTFT p99 ms", "step ms", "json/free"]
    lines = [header]
    for row in rows:
        for mode in ("free", "json"):
            r = row[mode]
            ratio = f"{row['throughput_ratio']:.2f}x tput, {row['ttft_p50_ratio']:.2f}x TTFT" if mode == "json" else ""
            lines.append(
                [
                    row["model_path"],
                    mode,
                    f"{r['output_tok_s']:.0f}",
                    f"{r['requests_per_s']:.2f}",
                    f"{r['mean_output_len']:.0f}",
                    f"{r['ttft_p50_s'] * 1e3:.0f}",
                    f"{r['ttft_p99_s'] * 1e3:.0f}",
                    _step_cell(r),
                    ratio,
                ]
            )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    for row in rows:
        for mode in ("free", "json"):
            r = row[mode]
            parts = r.get("step_host_parts_ms_p50")
            print(f"{row['model_path']} {mode} host ms of a full-batch step's turn, by part: {parts}")
            # [queued ms, batch size, device ms, idle ms before] of each step until the median TTFT
            print(f"{row['model_path']} {mode} steps until TTFT p50: {r.get('ttft_steps')}")


def main(argv: list[str]) -> list[dict[str, Any]]:
    args = parse_args(argv)
    schema = SCHEMA
    if args.schema:
        with open(args.schema) as f:
            schema = json.load(f)
    rows = []
    for model_path in args.model_path or MODELS:
        row = {
            "bench": "structured",
            "model_path": model_path,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "temperature": args.temperature,
            "overlap": not args.disable_overlap_schedule,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
            "tag": args.tag,
        }
        row.update(run_model(model_path, args, schema))
        rows.append(row)
        if args.result_file:
            with open(args.result_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
