"""A decode step's linear layers on the device: cuBLAS (torch's F.linear), cuBLASLt, and the Triton candidate
(scheduler_proc/layers/triton_linear.py) over a sweep of tilings and K splits, each call timed in a CUDA graph
of 20 as the engine replays them. Shapes: each model's q|k|v, o, gate|up, down and LM head at 64, 256 and 512
rows (a decode step's batch), from its config under configs/, random bf16 weights.

    python scripts/bench_gemm.py [--model qwen2.5-0.5b --model qwen3-0.6b ...] [--rows 256] [--fp8] [--out FILE]

Prints one line per shape (device us a call: cuBLAS, cuBLASLt, the Triton default, the best Triton tiling and
its ratio to cuBLAS, and what the weights' bytes would take at the copy bandwidth); --out appends JSON lines.
--fp8 times the FP8 layers' GEMM instead (quantization="fp8": e4m3 weights scaled per output row, activations
per token): the engine's call (the activations' quantization kernel, then torch._scaled_mm), each of the two
alone, and the Triton candidate's tilings on the quantized operands; its "cublas" column is _scaled_mm alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.bench_roofline import measure_ceilings  # noqa: E402
from engine.bench_tools import graph_us  # noqa: E402
from scheduler_proc.layers.fp8 import quantize_per_channel, scaled_mm  # noqa: E402
from scheduler_proc.layers.fp8_quant_kernel import quantize_rows  # noqa: E402
from scheduler_proc.layers.triton_linear import LinearConfig, default_config, triton_linear  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["qwen2.5-0.5b", "qwen3-0.6b", "llama-3.1-8b"]
# (block_m, block_n, block_k, num_warps, num_stages), each also with K split in 2, 4 and 8 where K allows.
_TILINGS = [
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 128, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),  # fewer re-reads of x and of the weight from L2, in fewer programs
    (64, 128, 128, 4, 3),  # FP8: 128 one-byte values a row are the 256 bytes of bf16's 128-wide blocks
    (128, 128, 128, 8, 3),
]
_SPLITS = (1, 2, 4, 8)


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(layer, out features N, in features K) of one decoder layer's GEMMs and the LM head."""
    with open(os.path.join(ROOT, "configs", model, "config.json")) as f:
        c = json.load(f)
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    kv_heads, head_dim = c.get("num_key_value_heads", heads), c.get("head_dim") or hidden // heads
    return [
        ("qkv", (heads + 2 * kv_heads) * head_dim, hidden),
        ("o", hidden, heads * head_dim),
        ("gate_up", 2 * c["intermediate_size"], hidden),
        ("down", hidden, c["intermediate_size"]),
        ("lm_head", c["vocab_size"], hidden),
    ]


def _cublaslt(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, weight)
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def time_shape(model: str, layer: str, m: int, n: int, k: int, bandwidth: float) -> list[dict]:
    """Every backend and tiling at one shape; the first row is cuBLAS's."""
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
    reference = F.linear(x, weight).float()
    base = {"model": model, "layer": layer, "rows": m, "n": n, "k": k, "weight_floor_us": 2 * n * k / bandwidth * 1e6}
    rows = [dict(base, backend="cublas", us=graph_us(lambda: F.linear(x, weight)))]
    rows.append(dict(base, backend="cublaslt", us=graph_us(lambda: _cublaslt(x, weight))))
    return rows + _triton_rows(base, reference, functools.partial(triton_linear, x, weight, None))


def time_fp8_shape(model: str, layer: str, m: int, n: int, k: int, bandwidth: float) -> list[dict]:
    """The FP8 GEMM at one shape: _scaled_mm alone first (the column compared with), then the engine's call,
    the quantization alone and the Triton tilings."""
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w_q, w_scale = quantize_per_channel(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen))
    x_q, x_scale = quantize_rows(x)
    reference = scaled_mm(x, w_q, w_scale, None).float()
    base = {"model": model, "layer": layer, "rows": m, "n": n, "k": k, "weight_floor_us": n * k / bandwidth * 1e6}

    def alone():
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)

    rows = [dict(base, backend="fp8 scaled_mm", us=graph_us(alone))]
    engine_us = graph_us(lambda: scaled_mm(x, w_q, w_scale, None))
    rows.append(dict(base, backend="fp8 engine (quantize + scaled_mm)", us=engine_us))
    rows.append(dict(base, backend="fp8 quantize", us=graph_us(lambda: quantize_rows(x))))
    call = functools.partial(triton_linear, x_q, w_q, None, scales=(x_scale, w_scale), out_dtype=x.dtype)
    return rows + _triton_rows(base, reference, lambda config: call(config=config), prefix="fp8 ")


def _triton_rows(base: dict, reference: torch.Tensor, call, prefix: str = "") -> list[dict]:
    """The Triton candidate's default tiling, then each of the sweep's, at one shape: call(config) -> output."""
    m, n, k = base["rows"], base["n"], base["k"]
    configs = [default_config(m, n, k)] + [
        LinearConfig(bm, bn, bk, split, warps, stages)
        for bm, bn, bk, warps, stages in _TILINGS
        for split in _SPLITS
        if k // (bk * split) >= 2
    ]
    rows = []
    for i, config in enumerate(configs):
        run = functools.partial(call, config)
        error = (run().float() - reference).abs().max().item()
        name = prefix + ("triton default" if i == 0 else "triton")
        rows.append(dict(base, backend=name, us=graph_us(run), max_abs_diff=error, **config.__dict__))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="a folder under configs/; repeat for several")
    p.add_argument("--rows", type=int, action="append", help="a step's batch; repeat (default 64, 256, 512)")
    p.add_argument("--fp8", action="store_true", help="the FP8 layers' GEMM (default models Llama-3.1-8B, Qwen3-0.6B)")
    p.add_argument("--out", help="append the JSON lines here")
    args = p.parse_args()
    timer = time_fp8_shape if args.fp8 else time_shape
    models = args.model or (["llama-3.1-8b", "qwen3-0.6b"] if args.fp8 else MODELS)
    bandwidth = measure_ceilings()["bandwidth_bytes_s"]  # the roofline's copy bandwidth
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'shape':<34}{'cublas':>9}{'lt':>9}{'tri def':>9}{'tri best':>9}{'x':>7}  {'floor':>6}  best tiling")
    out = []
    for model in models:
        for layer, n, k in layer_shapes(model):
            for m in args.rows or [64, 256, 512]:
                rows = timer(model, layer, m, n, k, bandwidth)
                cublas, lt = rows[0]["us"], rows[1]["us"]  # FP8: _scaled_mm alone, and with the quantization
                tri = [r for r in rows if "triton" in r["backend"]]
                default, best = tri[0]["us"], min(tri, key=lambda r: r["us"])
                tiling = {key: best[key] for key in LinearConfig.__dataclass_fields__}
                print(
                    f"{model + ' ' + layer + f' {m}x{n}x{k}':<34}{cublas:9.1f}{lt:9.1f}{default:9.1f}{best['us']:9.1f}"
                    f"{cublas / best['us']:6.2f}x  {rows[0]['weight_floor_us']:6.1f}  {tiling}"
                )
                out += rows
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in out)


if __name__ == "__main__":
    main()
