"""The physical floor of a workload: weights read once per decode step, each cached KV token read once
per generated token (at the measured copy bandwidth), prefill FLOPs at the measured matmul rate.
With tensor parallelism over N GPUs each reads 1/N of the weights and KV, so the floor has N GPUs'
bandwidth and FLOPs (the GPU measured is taken as typical of them). FP8 weights (quantization="fp8" or an
FP8 checkpoint) are read at one byte each but the embeddings and LM head, which stay in bf16, and an
FP8 KV cache at one byte per element; prefill is still counted at the bf16 matmul rate."""

from __future__ import annotations

from typing import Any, Optional

from engine.bench_workloads import Workload


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def timed(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps

    bandwidth = 2 * x.numel() / timed(lambda: y.copy_(x), 20)
    flops = 2 * 8192**3 / timed(lambda: a @ b, 20)
    x = y = a = b = None  # freed before the engine sizes its KV pool
    torch.cuda.empty_cache()
    return {"bandwidth_bytes_s": bandwidth, "matmul_flops": flops}


def roofline(
    model_path: Optional[str], workload: Workload, settings: dict[str, Any], ferry: dict[str, Any]
) -> dict[str, Any]:
    from engine.shared.args import read_model_config
    from engine.shared.model_files import resolve_model_path

    config = read_model_config(resolve_model_path(model_path, settings.get("cache_dir")))
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    batch = min(len(workload.input_ids), int(settings.get("max_running_requests") or len(workload.input_ids)))
    params, read_per_step, active = model_params(config, batch)
    weight_bytes = _weight_bytes(config, read_per_step, settings)
    kv_element_bytes = 1 if settings.get("kv_cache_dtype") == "fp8_e4m3" else 2
    kv_bytes_per_token = 2 * kv_element_bytes * layers * kv_heads * head_dim
    ceilings = measure_ceilings()
    tp_size = int(settings.get("tp_size", 1))
    # Every request decodes at once (the engine's batch holds them all), so there are max(out) steps.
    steps = max(workload.output_lens)
    kv_read = sum(n * len(ids) + n * (n - 1) / 2 for ids, n in zip(workload.input_ids, workload.output_lens))
    decode_s = (steps * weight_bytes + kv_read * kv_bytes_per_token) / (tp_size * ceilings["bandwidth_bytes_s"])
    prefill_s = 2 * active * workload.input_tokens / (tp_size * ceilings["matmul_flops"])
    floor = workload.output_tokens / (decode_s + prefill_s)
    return {
        **ceilings,
        "tp_size": tp_size,
        "params": params,
        "active_params": active,
        "weight_bytes": weight_bytes,
        "decode_floor_s": decode_s,
        "prefill_floor_s": prefill_s,
        "floor_output_tok_s": floor,
        "fraction_of_floor": ferry["output_tok_s"] / floor,
    }


def _weight_bytes(config: dict[str, Any], read_per_step: float, settings: dict[str, Any]) -> float:
    """Bytes of weights a decode step reads: bf16, or FP8 linear layers beside bf16 embeddings and LM head."""
    fp8 = (
        settings.get("quantization") == "fp8" or (config.get("quantization_config") or {}).get("quant_method") == "fp8"
    )
    if not fp8:
        return 2 * read_per_step
    embeddings = config["vocab_size"] * config["hidden_size"] * (1 if config.get("tie_word_embeddings") else 2)
    return 2 * embeddings + (read_per_step - embeddings)


def model_params(config: dict[str, Any], batch: int) -> tuple[int, float, int]:
    """(all parameters, parameters a decode step of `batch` sequences reads, parameters one token
    computes with). Dense models read and compute with all of them. A mixture of experts computes with
    its top-k experts per token (the active parameters) and a step reads the experts any of its tokens
    chose: with uniform routing, num_experts * (1 - (1 - k / num_experts) ** batch) of them."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    dense_mlp = 3 * hidden * config["intermediate_size"]
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    if not experts:
        total = layers * (attention + dense_mlp) + embeddings
        return total, total, total
    top_k, expert = (
        int(config["num_experts_per_tok"]),
        3 * hidden * int(config.get("moe_intermediate_size") or config["intermediate_size"]),
    )
    step = int(config.get("decoder_sparse_step", 1))
    sparse = [i for i in range(layers) if i not in (config.get("mlp_only_layers") or []) and (i + 1) % step == 0]
    shared = layers * attention + (layers - len(sparse)) * dense_mlp + embeddings + len(sparse) * hidden * experts
    touched = experts * (1 - (1 - top_k / experts) ** batch)
    return (
        shared + len(sparse) * experts * expert,
        shared + len(sparse) * touched * expert,
        shared + len(sparse) * top_k * expert,
    )
