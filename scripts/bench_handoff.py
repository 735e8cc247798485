"""The tensor-parallel step hand-off alone: rank 0 sends a decode step of `batch` requests (with their
req_to_token writes) `steps` times to rank 1, which receives and unpacks each, in two processes of a real
group: NCCL on two GPUs, or gloo on the CPU. No model runs, so the figures are the hand-off's own: rank 0's
time to send a step (the target is <= 100 us at batch 64 on the GPUs) and rank 1's time to unpack one.

  python scripts/bench_handoff.py --device cpu                  # anywhere
  python scripts/bench_handoff.py --device cuda --out $OUT      # on a machine with two GPUs

Prints a table and appends a JSON line to <out>/tp.jsonl (also run by `scripts/bench_tp.py check`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WARMUP = 100


def handoff(out: str, device: str, batch: int = 64, steps: int = 3000) -> dict[str, Any]:
    """Run the two ranks, print their figures and append them to <out>/tp.jsonl."""
    init = os.path.join(tempfile.mkdtemp(prefix="ferry-handoff-"), "init")
    spec = json.dumps({"init": init, "device": device, "batch": batch, "steps": steps})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, "_rank", str(rank), spec], stdout=subprocess.PIPE, text=True, env=env
        )
        for rank in (0, 1)
    ]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in ranks]
    row = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "part": "handoff", "device": device, "batch": batch, "tp": 2}
    row |= results[0] | results[1] | {"target": "<= 100 us send_us_median (on the GPUs)"}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tp.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    for key, value in row.items():
        print(f"  {key:<18}  {value:.4g}" if isinstance(value, float) else f"  {key:<18}  {value}")
    return row


def _rank(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from scheduler_proc.forward_batch import ForwardBatch
    from scheduler_proc.tp.group import join_group
    from scheduler_proc.tp.step_broadcast import StepChannel

    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    tp = join_group(rank, 2, f"file://{spec['init']}", device)
    channel, batch, steps = StepChannel(tp, device), spec["batch"], spec["steps"]
    times = []
    if rank == 0:
        ids = torch.arange(batch, device=device)
        step = ForwardBatch(ids, ids + 500, ids + 9000, ids, [500] * batch, [1] * batch, ids, is_decode=True)
        writes = (ids, ids + 500, ids + 9000)
        for _ in range(steps):
            start = time.perf_counter()
            channel.send(step, writes)
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = sorted(times[_WARMUP:])
        return {"send_us_median": 1e6 * statistics.median(times), "send_us_p90": 1e6 * times[int(0.9 * len(times))]}
    begin = time.perf_counter()
    for _ in range(steps):
        packet = tp.broadcast_ints()
        start = time.perf_counter()
        channel.receive(packet)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"receive_us_median": 1e6 * statistics.median(times), "step_us": 1e6 * (time.perf_counter() - begin) / steps}


def main() -> None:
    if sys.argv[1:2] == ["_rank"]:
        print(json.dumps(_rank(int(sys.argv[2]), json.loads(sys.argv[3]))), flush=True)
        os._exit(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the two ranks run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = p.parse_args()
    handoff(args.out, args.device, args.batch, args.steps)


if __name__ == "__main__":
    main()
