"""What the scripts that compare settings share (scripts/bench_tp.py, bench_dp.py, bench_fp8.py): a run of the
throughput harness (engine/bench.py) in a process of its own, so that each run gets a fresh engine and, on a
GPU, the whole device's memory; a result row appended as a JSON line and printed; and the kernel benchmarks'
(bench_triton_decode.py, bench_gemm.py) timing of one call inside a CUDA graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_harness(flags: list[str], tag: str, result_file: Optional[str], timeout: int) -> Optional[dict[str, Any]]:
    """`python -m engine.bench <flags>` from this checkout; prints the command and the tail of its output, appends
    its JSON line to result_file (when given) and returns it: None when the run failed or ran out of time."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as own:
        cmd = [sys.executable, "-m", "engine.bench", *flags, "--result-file", own.name, "--tag", tag]
        print(" ".join(cmd[1:]), flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_ROOT, env=env)
        except subprocess.TimeoutExpired:
            print(f"timed out after {timeout}s", flush=True)
            return None
        print(proc.stdout[-3000:] if proc.returncode == 0 else proc.stderr[-3000:], flush=True)
        lines = own.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    if result_file:
        with open(result_file, "a") as f:
            f.write(lines[-1] + "\n")
    return json.loads(lines[-1])


def record(path: str, row: dict[str, Any]) -> None:
    """Append row (dated) to the JSON-lines file at path, and print it one field a line."""
    row = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **row}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"  {key:<{width}}  {value:.4g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    print(flush=True)


def graph_us(fn: Callable[[], Any], calls: int = 20, reps: int = 20) -> float:
    """Device µs of one call, from a CUDA graph of `calls` back-to-back calls (median of reps replays): a
    kernel of tens of µs launched from Python one call at a time times the host's launch, not the kernel."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]
