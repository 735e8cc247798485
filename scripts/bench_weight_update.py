"""The engine inside a trainer, on the device (issue 23): how fast new weights get in, and how much device
memory a release hands back.

    python scripts/bench_weight_update.py [--tp-size 1] [--result-file docs/bench/X.jsonl]
    (on the device machine: bash scripts/device_run.sh python3 scripts/bench_weight_update.py ...)

Three measurements on Llama-3.1-8B with random bf16 weights (load_format="dummy"):
1. update_weights_from_tensor of every weight, from GPU tensors of this (the caller's) process on the
   engine's GPU: CUDA IPC, each rank copying its shard in place (target: <= 2 s for 16 GB).
2. update_weights_from_distributed of every weight over NCCL, broadcast by a trainer subprocess (rank 0
   of the group, on the GPU before the engine's: NCCL puts no two ranks of a group on one GPU, so this
   needs --tp-size + 1 GPUs and is skipped with fewer).
3. release_memory_occupation / resume_memory_occupation: torch.cuda.mem_get_info of the engine's first
   GPU before and after, the share of the engine's footprint there (what its start took) handed back
   (target: >= 90%), both times, and greedy ids unchanged.

Prints a table; with --result-file appends one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from engine.shared.child_process import MULTICAST_OFF_ENV  # noqa: E402

os.environ.update(MULTICAST_OFF_ENV)  # the trainer subprocess's NCCL too
GB = 1e9
GROUP = "bench-weights"


def checkpoint_tensors(model_path: str, device: str, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Every weight of the model under its Hugging Face name, random bf16 on `device` (what a trainer holds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = []
    for name, param in skeleton.state_dict().items():
        tensor = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
        tensor.normal_(0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.02, generator=generator)
        if param.dim() == 1 and "norm" in name:
            tensor.fill_(1.0)
        tensors.append((name, tensor))
    return tensors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        assert result is None or result[0], result
    return times


def bench_from_tensor(engine, tensors, repeats: int) -> dict:
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    torch.cuda.synchronize()
    times = timed(lambda: engine.update_weights_from_tensor(tensors), repeats)
    best = min(times)
    return {
        "what": "update_weights_from_tensor",
        "gb": nbytes / GB,
        "seconds": best,
        "gb_per_s": nbytes / GB / best,
        "seconds_all": times,
        "tensors": len(tensors),
    }


def trainer_main(model_path: str, port: int, world_size: int, device: str, commands, replies) -> None:
    """The trainer subprocess: rank 0 of the update group; broadcasts every weight on each command."""
    from scheduler_proc.weight_group import init_custom_process_group

    torch.cuda.set_device(device)
    group = init_custom_process_group("nccl", f"tcp://127.0.0.1:{port}", world_size, 0, GROUP)
    tensors = checkpoint_tensors(model_path, device, seed=1)
    replies.put([(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in tensors])
    while commands.get() == "broadcast":
        for _, tensor in tensors:
            torch.distributed.broadcast(tensor, src=0, group=group)
        torch.cuda.synchronize()
        replies.put("done")
    torch.distributed.destroy_process_group(group)


def bench_from_distributed(engine, args, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    port, world_size = free_port(), 1 + args.tp_size
    trainer = ctx.Process(target=trainer_main, args=(args.model_path, port, world_size, "cuda:0", commands, replies))
    trainer.start()
    try:
        joined = engine.init_weights_update_group("127.0.0.1", port, 1, world_size, GROUP, backend="nccl")
        assert joined[0], joined
        specs = replies.get(timeout=600)
        names, dtypes, shapes = ([s[i] for s in specs] for i in range(3))
        nbytes = sum(torch.Size(shape).numel() * 2 for shape in shapes)

        def update():
            commands.put("broadcast")
            result = engine.update_weights_from_distributed(names, dtypes, shapes, GROUP)
            assert replies.get(timeout=600) == "done"
            return result

        times = timed(update, repeats)
    finally:
        engine.destroy_weights_update_group(GROUP)
        commands.put("stop")
        trainer.join(timeout=60)
    best = min(times)
    return {
        "what": "update_weights_from_distributed",
        "gb": nbytes / GB,
        "seconds": best,
        "gb_per_s": nbytes / GB / best,
        "seconds_all": times,
        "tensors": len(names),
    }


def bench_release(engine, engine_bytes: int, device: int) -> dict:
    prompt = {"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8]] * 4, "sampling_params": {"temperature": 0, "max_new_tokens": 32}}
    before_ids = [o["output_ids"] for o in engine.generate(**prompt)]
    free_before = torch.cuda.mem_get_info(device)[0]
    start = time.perf_counter()
    engine.release_memory_occupation()
    release_s = time.perf_counter() - start
    free_released = torch.cuda.mem_get_info(device)[0]
    start = time.perf_counter()
    engine.resume_memory_occupation()
    resume_s = time.perf_counter() - start
    free_resumed = torch.cuda.mem_get_info(device)[0]
    same = [o["output_ids"] for o in engine.generate(**prompt)] == before_ids
    handed_back = free_released - free_before
    return {
        "what": "release_memory_occupation",
        "engine_gb": engine_bytes / GB,
        "handed_back_gb": handed_back / GB,
        "handed_back_share": handed_back / engine_bytes,
        "release_s": release_s,
        "resume_s": resume_s,
        "free_gb": [free_before / GB, free_released / GB, free_resumed / GB],
        "same_outputs": same,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'measurement':<34}{'GB':>8}{'seconds':>10}{'GB/s':>8}   notes")
    for row in rows:
        if "gb_per_s" in row:
            print(
                f"{row['what']:<34}{row['gb']:8.2f}{row['seconds']:10.3f}{row['gb_per_s']:8.1f}   "
                f"{row['tensors']} tensors, runs {[round(t, 3) for t in row['seconds_all']]}"
            )
        else:
            print(
                f"{row['what']:<34}{row['handed_back_gb']:8.2f}{row['release_s']:10.3f}{'':>8}   "
                f"{row['handed_back_share']:.1%} of the engine's {row['engine_gb']:.2f} GB handed back; "
                f"resume {row['resume_s']:.3f} s; same outputs: {row['same_outputs']}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=os.path.join(ROOT, "configs/llama-3.1-8b"))
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-fraction-static", type=float, default=0.6, help="room for the caller's own copy")
    p.add_argument("--result-file", default=None, help="append one JSON line per measurement")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    from engine import Engine

    gpus = torch.cuda.device_count()
    distributed = gpus >= args.tp_size + 1
    base = 1 if distributed else 0  # the trainer subprocess takes cuda:0
    free_start = torch.cuda.mem_get_info(base)[0]
    engine = Engine(
        args.model_path,
        load_format="dummy",
        dtype="bfloat16",
        tp_size=args.tp_size,
        base_gpu_id=base,
        mem_fraction_static=args.mem_fraction_static,
        log_level="warning",
    )
    rows = []
    try:
        engine_bytes = free_start - torch.cuda.mem_get_info(base)[0]
        tensors = checkpoint_tensors(args.model_path, f"cuda:{base}")
        rows.append(bench_from_tensor(engine, tensors, args.repeats))
        del tensors
        torch.cuda.empty_cache()
        if distributed:
            rows.append(bench_from_distributed(engine, args, args.repeats))
        else:
            print(f"skipping update_weights_from_distributed: it needs {args.tp_size + 1} GPUs, {gpus} visible")
        rows.append(bench_release(engine, engine_bytes, base))
    finally:
        engine.shutdown()
    print_table(rows)
    if args.result_file:
        common = {
            "model": os.path.basename(args.model_path.rstrip("/")),
            "tp_size": args.tp_size,
            "tag": args.tag,
            "device": torch.cuda.get_device_name(base),
            "commit": _commit(),
            "time": time.time(),
        }
        with open(args.result_file, "a") as f:
            for row in rows:
                f.write(json.dumps(common | row) + "\n")
        print(f"appended {len(rows)} lines to {args.result_file}")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
