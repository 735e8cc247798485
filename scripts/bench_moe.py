"""The fused mixture-of-experts layer (layers/fused_moe.py, Triton grouped GEMMs) against the per-expert loop
(layers/moe.py: expert_loop), on one GPU, at Qwen3-30B-A3B's shapes by default (hidden 2048, 128 experts of
width 768, 8 per token, bf16): device time per call for each batch size, the two paths' agreement, and the
bandwidth and FLOP rate the fused path reaches. One command on the device machine:

    python scripts/bench_moe.py [--batch-sizes 1,8,32,256,1024,4096] [--tp-size 1] \
        [--result-file docs/bench/<date>-h200-moe.jsonl]

--tp-size N times one rank's shard (each expert's width / N), as that rank runs it under tensor parallelism.
Routing is the real router's over random hidden states (near-uniform over the experts, as random weights give).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.shared.args import read_model_config  # noqa: E402
from scheduler_proc.layers.moe import expert_loop, route  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def device_ms(fn: Callable[[], object], reps: int) -> float:
    """Mean device time of fn in ms (CUDA events around `reps` calls, after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure(batch: int, shapes: dict, dtype: torch.dtype, reps: int) -> dict:
    from scheduler_proc.layers.fused_moe import fused_experts

    hidden, inter, experts, top_k = shapes["hidden"], shapes["inter"], shapes["experts"], shapes["top_k"]
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, hidden, device="cuda", generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).to(dtype)
    router = (torch.randn(experts, hidden, device="cuda", generator=gen) * hidden**-0.5).to(dtype)
    weights, ids = route(x @ router.T, top_k, renormalize=True)
    fused = fused_experts(x, w13, w2, weights, ids)
    loop = expert_loop(x, w13, w2, weights, ids)
    rel_error = ((fused.float() - loop.float()).norm() / loop.float().norm()).item()
    loop_ms = device_ms(lambda: expert_loop(x, w13, w2, weights, ids), reps)
    fused_ms = device_ms(lambda: fused_experts(x, w13, w2, weights, ids), reps)
    graph = torch.cuda.CUDAGraph()  # the fused path must capture: decode steps replay in CUDA graphs
    with torch.cuda.graph(graph):
        fused_experts(x, w13, w2, weights, ids)
    graph_ms = device_ms(graph.replay, reps)
    touched = int(torch.unique(ids).numel())
    bytes_read = touched * 3 * hidden * inter * x.element_size()
    flops = 2 * batch * top_k * 3 * hidden * inter
    return {
        "batch": batch,
        "loop_ms": loop_ms,
        "fused_ms": fused_ms,
        "fused_graph_ms": graph_ms,
        "speedup": loop_ms / fused_ms,
        "experts_touched": touched,
        "fused_weight_tb_s": bytes_read / (fused_ms / 1e3) / 1e12,
        "fused_tflops": flops / (fused_ms / 1e3) / 1e12,
        "rel_error_vs_loop": rel_error,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=os.path.join(CONFIGS, "qwen3-30b-a3b"), help="a MoE config.json folder")
    parser.add_argument("--batch-sizes", default="1,8,32,256,1024,4096", help="tokens per call, comma-separated")
    parser.add_argument("--tp-size", type=int, default=1, help="time one rank's shard of each expert")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--result-file", help="append one JSON line per batch size here")
    args = parser.parse_args(argv)
    config = read_model_config(args.model_path)
    shapes = {
        "hidden": int(config["hidden_size"]),
        "inter": int(config.get("moe_intermediate_size") or config["intermediate_size"]) // args.tp_size,
        "experts": int(config.get("num_experts") or config["num_local_experts"]),
        "top_k": int(config["num_experts_per_tok"]),
    }
    device = torch.cuda.get_device_name()
    name = os.path.basename(args.model_path.rstrip("/"))
    print(f"{name} experts on {device}: {shapes}, {args.dtype}, tp {args.tp_size}")
    columns = ["loop ms", "fused ms", "graph ms", "speedup", "experts", "TB/s", "TFLOP/s", "rel err"]
    print(f"{'batch':>6} " + " ".join(f"{c:>9}" for c in columns))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = measure(batch, shapes, getattr(torch, args.dtype), args.reps)
        print(
            f"{row['batch']:>6} {row['loop_ms']:>9.3f} {row['fused_ms']:>9.3f} {row['fused_graph_ms']:>9.3f} "
            f"{row['speedup']:>8.2f}x {row['experts_touched']:>9} {row['fused_weight_tb_s']:>9.2f} "
            f"{row['fused_tflops']:>9.1f} {row['rel_error_vs_loop']:>9.2e}"
        )
        if args.result_file:
            line = {"bench": "moe_layer", "model": args.model_path, "device": device, "dtype": args.dtype}
            line |= {"tp_size": args.tp_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **shapes, **row}
            with open(args.result_file, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
