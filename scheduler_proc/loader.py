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
from scheduler_proc.models.decoder import CausalLM
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
) -> CausalLM:
    """Build on the meta device (no memory), materialise on `device`, then fill the weights. An embedding
    model's checkpoint may lack the LM head (it is never used)."""
    check_model_config(config)
    arch = architecture(config)
    with torch.device("meta"):
        model = ARCHITECTURES[arch](config, tp=tp or TPGroup())
    model = model.to(dtype).to_empty(device=device)
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
    return model.eval()


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
