"""FP8 checkpoint folders for tests, written from a tiny float32 folder in HF's FP8 layout: each linear
weight in float8_e4m3fn beside its scale (`weight_scale_inv` per block, or `weight_scale` per tensor or
per row), with `quantization_config` in config.json; and the same model with the dequantized weights
in float32, the reference its outputs must equal. The quantizer here is written independently of
scheduler_proc/layers/fp8.py (plain loops over blocks)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def block_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale_inv) with weight ~= q * scale_inv per block, block by block."""
    rows, cols = weight.shape
    scale = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    q = torch.empty(rows, cols, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = tile.abs().max() / 448.0
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (tile / scale[i, j]).to(FP8)
    return q, scale


def block_dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def _quantize(weight: torch.Tensor, scheme: str, block: Optional[tuple[int, int]]):
    """(q, scale name, scale, dequantized weight) of one checkpoint weight."""
    if scheme == "block":
        q, scale = block_quantize(weight, block)
        return q, "weight_scale_inv", scale, block_dequantize(q, scale, block)
    if scheme == "tensor":
        scale = weight.abs().max() / 448.0
        q = (weight / scale).to(FP8)
        return q, "weight_scale", scale, q.float() * scale
    scale = weight.abs().amax(dim=1, keepdim=True) / 448.0  # per output row, [N, 1]
    q = (weight / scale).to(FP8)
    return q, "weight_scale", scale, q.float() * scale


def write_fp8_folders(
    source: str, out: Path, scheme: str, block: Optional[tuple[int, int]] = None, kv_scales: bool = False
) -> tuple[str, str]:
    """(FP8 folder, dequantized float32 folder) made from the float32 folder `source`. scheme: "block",
    "tensor" or "channel". kv_scales: also a self_attn.k_scale / v_scale per layer (0.5 and 0.25)."""
    fp8_dir, ref_dir = out / f"fp8-{scheme}", out / f"dequantized-{scheme}"
    for folder in (fp8_dir, ref_dir):
        shutil.copytree(source, folder)
    tensors = load_file(f"{source}/model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, scale_name, scale, weight = _quantize(tensor, scheme, block)
            quantized[name], quantized[name[: -len("weight")] + scale_name] = q, scale
            dequantized[name] = weight
        else:
            quantized[name] = dequantized[name] = tensor
    if kv_scales:
        for layer in {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}:
            quantized[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.5)
            quantized[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(quantized, f"{fp8_dir}/model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, f"{ref_dir}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    if block is not None:
        config["quantization_config"]["weight_block_size"] = list(block)
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return str(fp8_dir), str(ref_dir)
