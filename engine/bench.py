"""Offline throughput benchmark (`python -m engine.bench` or scripts/bench_offline_throughput.py),
modelled on SGLang's bench_offline_throughput: prints a table and appends one JSON line per run.
Every EngineArgs field passes through as a flag: `--tp-size 2`, `--mem-fraction-static 0.95`, ...
`--workload nanovllm,512x256,decode-heavy` times several named workloads on one engine, its prefix cache
emptied before each (one start-up instead of three on a device call)."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from typing import Any, Optional

from engine.bench_workloads import NAMED, Workload, random_ids, shared_prefix
from engine.shared.args import EngineArgs, field_names


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-path", default=None)
    p.add_argument(
        "--workload",
        type=_workload_names,
        help=f"named workloads, comma-separated (overrides the dataset flags): {', '.join(sorted(NAMED))}",
    )
    p.add_argument("--dataset-name", default="random-ids", choices=["random", "random-ids", "shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--shared-prefix-len", type=int, default=1024)
    p.add_argument("--num-groups", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--temperature", type=float, default=None, help="override the workload's temperature")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stream", action="store_true", help="stream every request; report TTFT and ITL")
    p.add_argument("--baseline", choices=["hf"], default=None)
    p.add_argument("--hf-batch-size", type=int, default=256)
    p.add_argument("--roofline", action="store_true")
    p.add_argument("--result-file", default=None)
    p.add_argument("--tag", default="", help="free text stored in the JSON line")
    args, rest = p.parse_known_args(argv)
    return args, _engine_settings(rest)


def _engine_settings(rest: list[str]) -> dict[str, Any]:
    """Pass `--any-engine-setting value` through to Engine, typed from EngineArgs' defaults."""
    defaults = EngineArgs()
    settings: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        flag = rest[i]
        name = flag.lstrip("-").replace("-", "_")
        if not flag.startswith("--") or name not in field_names():
            raise SystemExit(f"unknown argument {flag!r}")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            settings[name] = True
            i += 1
            continue
        value = rest[i + 1]
        settings[name] = type(default)(value) if default is not None else _guess(value)
        i += 2
    return settings


def _workload_names(value: str) -> list[str]:
    names = value.split(",")
    unknown = [n for n in names if n not in NAMED]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown workload {unknown[0]!r} (choose from {', '.join(sorted(NAMED))})")
    return names


def _guess(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def make_workloads(args: argparse.Namespace) -> list[Workload]:
    if args.workload:
        return [NAMED[name]() for name in args.workload]
    if args.dataset_name == "shared-prefix":
        per_group = max(1, args.num_prompts // args.num_groups)
        return [
            shared_prefix(
                args.num_groups,
                per_group,
                args.shared_prefix_len,
                args.random_input_len,
                args.random_output_len,
                args.seed,
            )
        ]
    return [
        random_ids(args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, args.seed)
    ]


def run_ferry(engine: Any, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of the workload on a started engine, from an empty prefix cache."""
    temperature = workload.temperature if args.temperature is None else args.temperature
    params = [
        {"max_new_tokens": n, "temperature": temperature, "ignore_eos": args.ignore_eos} for n in workload.output_lens
    ]
    flushed = engine.flush_cache()
    if not flushed["ok"]:
        raise RuntimeError(f"could not empty the prefix cache before a run: {flushed['message']}")
    warm_up(engine, workload)
    start = time.perf_counter()
    if args.stream:
        outputs, latency = _run_streams(engine, workload, params)
    else:
        outputs, latency = engine.generate(input_ids=workload.input_ids, sampling_params=params), {}
    wall = time.perf_counter() - start
    info = engine.get_server_info()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    return {
        "wall_s": wall,
        "requests_per_s": len(outputs) / wall,
        "input_tok_s": workload.input_tokens / wall,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (workload.input_tokens + out_tokens) / wall,
        "output_tokens": out_tokens,
        "cached_tokens": sum(o["meta_info"]["cached_tokens"] for o in outputs),
        "peak_gpu_memory_gib": info.get("peak_gpu_memory_bytes", 0) / 2**30,
        "tp_size": info.get("tp_size", 1),
        "dp_size": info.get("dp_size", 1),
        "rank_peak_gpu_memory_gib": [r["peak_gpu_memory_bytes"] / 2**30 for r in info.get("rank_memory", [])],
        "tp_step_broadcast_us": info.get("tp_step_broadcast_us", 0.0),
        "kv_pool_tokens": info["kv_pool_tokens"],
        "device": info.get("device_name", info.get("device")),
        **latency,
        **step_stats(info.get("step_profile"), start, start + wall),
    }


def warm_up(engine: Any, workload: Workload) -> None:
    """First-call costs (kernel loading and tuning, the allocator's first large blocks) before timing: a
    sampled and a greedy call over prompts of mixed lengths, as the peer's harness (.peer/run_minisgl.py),
    none longer than the workload's longest prompt nor with ids above its largest."""
    rng = random.Random(12345)
    longest, top = max(map(len, workload.input_ids)), min(10000, max(map(max, workload.input_ids)))
    for temperature in (0.6, 0.0):
        lengths = (min(n, longest) for n in (5, 50, 130, 300, 700, 1024, 1500, 17))
        prompts = [[rng.randint(0, top) for _ in range(n)] for n in lengths]
        params = {"temperature": temperature, "ignore_eos": True, "max_new_tokens": 32}
        engine.generate(input_ids=prompts, sampling_params=params, use_tqdm=False)


def step_stats(profile: Optional[dict[str, list]], since: float, until: float) -> dict[str, Any]:
    """From the steps recorded with --profile-steps: p50/p99 of the decode steps run at (near) the run's
    largest batch (device time, device idle time before the step, host time per step, wall and on the
    scheduler thread's CPU), and the totals of device and idle time over decode-only and prefill/mixed
    steps. Only steps queued after `since` (the timed run's start, on the clock the scheduler uses) count:
    the warm-up's first steps compile kernels."""
    if not profile or not profile["batch_size"]:
        return {}
    timed = [i for i, clock in enumerate(profile["clock"]) if clock >= since]
    if not timed:
        return {}
    profile = {key: [values[i] for i in timed] for key, values in profile.items()}
    profile["gap_ms"][0] = None  # the idle before the first timed step began before the timer did
    decode = profile["decode"]
    # Host time outside the steps: from the call to the first step queued (frontend, transfer, admission,
    # the first step's building) and from the last step queued until the call returned.
    stats: dict[str, Any] = {"lead_s": profile["clock"][0] - since, "tail_s": until - profile["clock"][-1]}
    for kind, want in (("decode", True), ("prefill", False)):
        steps = [i for i, d in enumerate(decode) if d == want]
        stats[f"{kind}_steps"] = len(steps)
        stats[f"{kind}_gpu_s"] = sum(profile["gpu_ms"][i] for i in steps) / 1e3
        stats[f"{kind}_gap_s"] = sum(profile["gap_ms"][i] or 0.0 for i in steps) / 1e3
    sizes = [b for b, d in zip(profile["batch_size"], decode) if d]
    if not sizes:
        return stats
    peak = max(sizes)
    keep = [i for i, (b, d) in enumerate(zip(profile["batch_size"], decode)) if d and b >= 0.9 * peak]
    stats.update({"profile_steps": len(keep), "profile_batch_size": peak})
    for key in ("gpu_ms", "gap_ms", "host_ms", "host_cpu_ms"):
        values = sorted(v for i in keep if (v := (profile.get(key) or [None] * len(decode))[i]) is not None)
        if values:
            stats[f"step_{key}_p50"] = values[len(values) // 2]
            stats[f"step_{key}_p99"] = values[min(len(values) - 1, int(len(values) * 0.99))]
    # Where the host time of those steps' turns went: each part's median ms (the scheduler's marks).
    host_parts = profile.get("host_parts") or [None] * len(decode)
    parts = [host_parts[i] for i in keep if host_parts[i]]
    if parts:
        names = sorted({name for p in parts for name in p})
        stats["step_host_parts_ms_p50"] = {
            name: round(sorted(p.get(name, 0.0) for p in parts)[len(parts) // 2], 3) for name in names
        }
    return stats


def _run_streams(engine: Any, workload: Workload, params: list[dict]) -> tuple[list[dict], dict[str, float]]:
    import asyncio

    async def one(ids: list[int], p: dict) -> tuple[dict, float, list[float]]:
        start = time.perf_counter()
        stamps, last = [], None
        async for chunk in await engine.async_generate(input_ids=ids, sampling_params=p, stream=True):
            stamps.append(time.perf_counter())
            last = chunk
        return last, stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]

    async def all_streams() -> list:
        return await asyncio.gather(*(one(ids, p) for ids, p in zip(workload.input_ids, params)))

    results = asyncio.run(all_streams())
    ttft = sorted(r[1] for r in results)
    itl = sorted(x for r in results for x in r[2]) or [0.0]

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    final = [dict(r[0], meta_info=dict(r[0]["meta_info"])) for r in results]
    for out, r in zip(final, results):
        out["meta_info"]["completion_tokens"] = r[0]["meta_info"]["completion_tokens"]
    stats = {
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_s": pct(itl, 0.5),
        "itl_p99_s": pct(itl, 0.99),
    }
    return final, stats


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every workload asked for, timed in turn on one engine; returns their results (as the JSON lines)."""
    from engine import Engine

    args, settings = parse_args(argv)
    workloads = make_workloads(args)
    results = []
    with Engine(model_path=args.model_path, **settings) as engine:
        for workload in workloads:
            results.append(time_one(engine, workload, args, settings))
            if args.baseline is None:
                report(results[-1], args)
    if args.baseline == "hf":  # after the engine has given back its GPU memory
        from engine.bench_hf import run_hf

        for workload, result in zip(workloads, results):
            result["hf"] = run_hf(args.model_path, workload, settings, args)
            result["ferry_over_hf"] = result["ferry"]["output_tok_s"] / result["hf"]["output_tok_s"]
            report(result, args)
    return results


def time_one(engine: Any, workload: Workload, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "workload": workload.name,
        "num_prompts": len(workload.input_ids),
        "input_tokens": workload.input_tokens,
        "requested_output_tokens": workload.output_tokens,
        "model_path": args.model_path,
        "engine_settings": settings,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "tag": args.tag,
    }
    result["ferry"] = run_ferry(engine, workload, args)
    if args.roofline:
        from engine.bench_roofline import roofline

        result["roofline"] = roofline(args.model_path, workload, settings, result["ferry"])
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print_table(result)
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(result) + "\n")


def print_table(result: dict[str, Any]) -> None:
    ferry = result["ferry"]
    rows = [
        ("workload", result["workload"]),
        ("prompts", result["num_prompts"]),
        ("input tokens", result["input_tokens"]),
        ("output tokens", ferry["output_tokens"]),
        ("wall (s)", f"{ferry['wall_s']:.2f}"),
        ("requests/s", f"{ferry['requests_per_s']:.2f}"),
        ("input tok/s", f"{ferry['input_tok_s']:.0f}"),
        ("output tok/s", f"{ferry['output_tok_s']:.0f}"),
        ("total tok/s", f"{ferry['total_tok_s']:.0f}"),
        ("peak GPU mem (GiB)", f"{ferry['peak_gpu_memory_gib']:.1f}"),
        ("KV pool (tokens)", ferry["kv_pool_tokens"]),
        ("tp_size", ferry.get("tp_size", 1)),
    ]
    for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"):
        if key in ferry:
            rows.append((key, f"{ferry[key] * 1000:.1f} ms"))
    for kind in ("prefill", "decode"):
        if f"{kind}_steps" in ferry:
            rows.append(
                (
                    f"{kind} steps: n, device s, idle s",
                    f"{ferry[f'{kind}_steps']}, {ferry[f'{kind}_gpu_s']:.2f}, {ferry[f'{kind}_gap_s']:.2f}",
                )
            )
    if "lead_s" in ferry:
        rows.append(("before first / after last step (s)", f"{ferry['lead_s']:.3f} / {ferry['tail_s']:.3f}"))
    if "profile_steps" in ferry:
        rows.append(
            ("profiled decode steps", f"{ferry['profile_steps']} at batch >= {0.9 * ferry['profile_batch_size']:.0f}")
        )
        for key in ("gpu_ms", "gap_ms", "host_ms", "host_cpu_ms"):
            if f"step_{key}_p50" in ferry:
                rows.append((f"step {key} p50/p99", f"{ferry[f'step_{key}_p50']:.2f} / {ferry[f'step_{key}_p99']:.2f}"))
    if "hf" in result:
        rows += [
            ("HF output tok/s", f"{result['hf']['output_tok_s']:.0f}"),
            ("ferry / HF", f"{result['ferry_over_hf']:.1f}x"),
        ]
    if "roofline" in result:
        r = result["roofline"]
        rows += [
            ("floor output tok/s", f"{r['floor_output_tok_s']:.0f}"),
            ("fraction of floor", f"{r['fraction_of_floor']:.1%}"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main(sys.argv[1:])
