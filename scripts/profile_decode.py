"""Where a decode step's time goes: the scheduler run in this process on a config folder (dummy weights),
`--batch` requests decoding, then `--steps` loop turns under cProfile (host, Python) and torch.profiler
(host ops and device kernels). Prints the top entries of each.

    python scripts/profile_decode.py --model-path configs/qwen2.5-0.5b --batch 256 [--temperature 0.6]
        [--json-schema TEXT] [--quantization fp8] [--trace $OUT/decode.json.gz]

On a CPU machine, a tiny config (one layer, hidden 64) makes the forward cheap, so that what is left
per step is the scheduler's host work: the part of a GPU step that CPU tests can measure.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


class _Sink:
    """Stands in for the detokenizer socket: the messages are built and encoded, then dropped."""

    def send(self, data: bytes) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--prefill", action="store_true", help="also profile the prefill of the batch (device kernels)")
    p.add_argument("--json-schema", help="constrain every request to this JSON Schema (text): the grammar's host cost")
    p.add_argument("--quantization", choices=["fp8"], help="FP8 weights, quantized as they load")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8_e4m3")
    p.add_argument("--trace", help="write the decode steps' timeline here (Chrome trace; .json.gz: gzipped)")
    args = p.parse_args()

    import torch
    import zmq

    from engine.shared.args import EngineArgs
    from engine.shared.ipc import Endpoints
    from engine.shared.protocol import GenerateRequest
    from engine.shared.sampling import SamplingParams
    from scheduler_proc.scheduler import Scheduler

    settings = EngineArgs(
        model_path=args.model_path,
        load_format="dummy",
        context_length=4096,
        cuda_graph_max_bs=max(args.batch, 8),
        max_running_requests=args.batch,
        disable_overlap_schedule=args.disable_overlap_schedule,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sched = Scheduler(settings.resolve(), Endpoints.in_dir(tempfile.mkdtemp()), zmq.Context())
    sched.io.to_detokenizer = _Sink()
    rng = random.Random(0)
    # Long enough for the prefill's turns and every profiled one, short enough that the whole batch fits the
    # context and the pool (a request that can only end by length reserves its whole length at admission).
    max_new = min(1024, settings.context_length - args.prompt_len)
    params = SamplingParams(
        temperature=args.temperature, max_new_tokens=max_new, ignore_eos=True, json_schema=args.json_schema
    )
    reqs = [
        GenerateRequest(
            rid=str(i),
            input_ids=[rng.randint(0, min(10000, sched.runner.shape.vocab_size - 1)) for _ in range(args.prompt_len)],
            sampling=params,
        )
        for i in range(args.batch)
    ]
    _prefill(sched, reqs, args, sync)
    _profile_decode(sched, args, sync)


def _profile_decode(sched, args, sync) -> None:
    """Decode steps: wall time per step, then cProfile (host) and torch.profiler (host ops, kernels)."""
    import torch

    for _ in range(20):
        sched.iterate()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        sched.iterate()
    sync()
    print(f"wall per step: {(time.perf_counter() - start) / args.steps * 1e3:.2f} ms at batch {len(sched.running)}")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        sched.iterate()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    with _kernel_profile(torch) as prof:
        for _ in range(args.steps):
            sched.iterate()
        sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.trace:  # where the device idles, and what the host does meanwhile (chrome://tracing, Perfetto)
        prof.export_chrome_trace(args.trace)  # gzipped by torch when the name ends in .gz
        print(f"timeline: {args.trace}")
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))


def _prefill(sched, reqs, args, sync) -> None:
    """Admit the batch and run until every request is decoding; with --prefill, under torch.profiler."""
    import msgspec
    import torch

    from engine.shared.protocol import GenerateBatch
    from engine.shared.sampling import SamplingParams

    if args.prefill:  # first calls (kernel loading, the allocator's first blocks) out of the profile
        short = SamplingParams(max_new_tokens=2, ignore_eos=True)
        sched.handle(
            GenerateBatch(reqs=[msgspec.structs.replace(r, rid=f"w{r.rid}", sampling=short) for r in reqs[:8]])
        )
        while sched.running or sched.waiting or sched.in_flight:
            sched.iterate()
        sync()
    prefill = _kernel_profile(torch) if args.prefill else contextlib.nullcontext()
    start, turns = time.perf_counter(), 0
    with prefill as prof:
        sched.handle(GenerateBatch(reqs=reqs))
        while len(sched.running) < args.batch or any(r.prefilling for r in sched.running):
            sched.iterate()
            turns += 1
        sync()
    print(
        f"prefill of {args.batch} x {args.prompt_len} tokens: {turns} loop turns, {time.perf_counter() - start:.3f} s"
    )
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))


def _kernel_profile(torch):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


if __name__ == "__main__":
    main()
