"""The HF transformers baseline for the benchmark: padded batch `generate`, bf16, sdpa, same prompts."""

from __future__ import annotations

import argparse
import time
from typing import Any, Optional

from engine.bench_workloads import Workload


def run_hf(
    model_path: Optional[str], workload: Workload, settings: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Prompts sorted by output length and batched, so each batch generates close to what it needs;
    only the requested tokens are counted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.shared.model_files import resolve_model_path

    path = resolve_model_path(model_path, settings.get("cache_dir"))
    cuda = torch.cuda.is_available() and settings.get("device", "auto") != "cpu"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if settings.get("load_format") == "dummy":
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    order = sorted(range(len(workload.input_ids)), key=lambda i: workload.output_lens[i])
    temperature = workload.temperature if args.temperature is None else args.temperature
    start = time.perf_counter()
    for first in range(0, len(order), args.hf_batch_size):
        chunk = order[first : first + args.hf_batch_size]
        _generate_batch(
            model,
            [workload.input_ids[i] for i in chunk],
            max(workload.output_lens[i] for i in chunk),
            temperature,
            device,
        )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {"wall_s": wall, "output_tok_s": workload.output_tokens / wall, "batch_size": args.hf_batch_size}


def left_pad(rows: list[list[int]]) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of rows padded on the left, as generate expects for decoder-only models."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _generate_batch(model: Any, prompts: list[list[int]], max_new: int, temperature: float, device: str) -> None:
    import torch

    ids, mask = left_pad(prompts)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=0,
            **sampling,
        )
