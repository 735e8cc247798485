"""Building a model from a HF folder: safetensors (sharded or not) or random weights ("dummy").

Under tensor parallelism each rank builds only its shard of every layer and reads only its slices
of the checkpoint tensors (safetensors slices are read lazily, block by block).
"""

from __future__ import annotations

import glob
import logging
import os
import zlib
from collections.abc import Iterator
from typing import Any, Optional

import torch

from engine.shared.model_config import architecture, check_model_config
from engine.shared.quant_config import Fp8Scheme, fp8_scheme
from scheduler_proc.layers.fp8 import fp8_matmul_supported
from scheduler_proc.layers.fp8_linear import finish_loading, to_fp8
from scheduler_proc.layers.linear import ColumnParallelLinear, RowParallelLinear
from scheduler_proc.layers.moe import SparseMoE
from scheduler_proc.models.decoder import CausalLM, DecoderLayer
from scheduler_proc.models.registry import ARCHITECTURES
from scheduler_proc.tp.group import TPGroup

logger = logging.getLogger(__name__)


def build_model(
    config: dict[str, Any],
    load_format: str,
    model_dir: str,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tp: Optional[TPGroup] = None,
    is_embedding: bool = False,
    quantization: Optional[str] = None,
) -> CausalLM:
    """Build on the meta device (no memory), materialise on `device`, then fill the weights. An embedding
    model's checkpoint may lack the LM head (it is never used). `quantization` "fp8", or an FP8 checkpoint,
    turns the linear layers FP8 before any weight is read (a 70B model never exists in bf16)."""
    check_model_config(config)
    arch = architecture(config)
    scheme = fp8_scheme(config, quantization)
    with torch.device("meta"):
        model = ARCHITECTURES[arch](config, tp=tp or TPGroup())
    model = model.to(dtype)
    if scheme is not None:  # still on meta: the FP8 weights are the only ones ever allocated
        convert_to_fp8(model, scheme)
        if dtype != torch.bfloat16 or not fp8_matmul_supported(device):
            logger.info("FP8 weights: no FP8 matmuls for %s on %s; dequantizing them to %s", dtype, device, dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    weights = random_weights(model, seed, device) if load_format == "dummy" else iter_safetensors(model_dir)
    loaded = model.load_weights(weights)
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if is_embedding and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
        model.lm_head.weight.data.zero_()
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"checkpoint in {model_dir} lacks weights for {missing[:5]}{more}")
    for module in model.modules():
        if getattr(module, "fp8", None) is not None:
            finish_loading(module, dtype)
    if scheme is not None:
        for module in model.modules():
            if isinstance(module, DecoderLayer):
                module.feed_fp8_projections()
    return model.eval()


def convert_to_fp8(model: CausalLM, scheme: Fp8Scheme) -> None:
    """Turn the model's column- and row-parallel linear layers FP8, but those the checkpoint leaves in
    high precision; experts of a mixture stay in the model's dtype (their FP8 checkpoints are refused)."""
    for name, module in model.named_modules():
        if isinstance(module, SparseMoE) and scheme.from_checkpoint:
            raise ValueError("FP8 checkpoints of mixture-of-experts models are not supported (their experts)")
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        parent = name.rsplit(".", 1)[0]
        names = [f"{parent}.{p.name}" for p in module.parts] if isinstance(module, ColumnParallelLinear) else [name]
        if not any(_ignored(n, scheme.ignored_layers) for n in names):
            to_fp8(module, scheme.weight_block_size)


def _ignored(name: str, ignored_layers: tuple[str, ...]) -> bool:
    """A checkpoint module listed as left unquantized (by its full name, or its name inside a layer)."""
    return any(name == ignored or name.endswith("." + ignored) for ignored in ignored_layers)


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, Any]]:
    """Stream (name, lazy slice) from every *.safetensors file: a tensor is read only when (and as
    far as) a layer indexes its slice."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir} (use load_format='dummy' for random weights)")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def random_weights(model: CausalLM, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors, for speed work without a checkpoint. Each full tensor comes from its
    own generator, seeded by (seed, name), in float32, and loads through the checkpoint path: every
    tp_size and dtype slices the same numbers, so TP=1 and TP=2 runs of one config hold one model.

    Scaled by 1/sqrt(fan_in) so activations keep their size through every layer, as in a trained
    model: with a fixed small std a deep, wide model's activations grow layer by layer and bf16
    rounding decides its outputs, which would make parity checks measure chaos instead of kernels."""
    for name, shape in model.checkpoint_shapes().items():
        if "norm" in name:
            yield name, torch.ones(shape, device=device)
        elif len(shape) == 1:
            yield name, torch.zeros(shape, device=device)
        else:
            name_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
            generator = torch.Generator(device=device).manual_seed(name_seed)
            yield name, torch.empty(shape, device=device).normal_(0.0, shape[1] ** -0.5, generator=generator)
