"""Building a model from a HF folder: safetensors (sharded or not) or random weights ("dummy")."""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Iterator

import torch

from scheduler_proc.models.decoder import CausalLM
from scheduler_proc.models.registry import ARCHITECTURES

logger = logging.getLogger(__name__)


def build_model(config: dict[str, Any], load_format: str, model_dir: str, dtype: torch.dtype,
                device: torch.device, seed: int) -> CausalLM:
    """Build on the meta device (no memory), materialise on `device`, then fill the weights."""
    arch = (config.get("architectures") or [""])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"model architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    with torch.device("meta"):
        model = ARCHITECTURES[arch](config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    if load_format == "dummy":
        _random_weights(model, seed)
    else:
        _load_checkpoint(model, model_dir)
    return model.eval()


def _load_checkpoint(model: CausalLM, model_dir: str) -> None:
    loaded = model.load_weights(iter_safetensors(model_dir))
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks weights for {missing[:5]}{'...' if len(missing) > 5 else ''}")


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) from every *.safetensors file; one tensor in host memory at a time."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir} (use load_format='dummy' for random weights)")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _random_weights(model: CausalLM, seed: int) -> None:
    """Random weights, the same for a given seed: for speed work without a checkpoint. Scaled by
    1/sqrt(fan_in) so activations keep their size through every layer, as in a trained model: with a
    fixed small std a deep, wide model's activations grow layer by layer and bf16 rounding decides its
    outputs, which would make parity checks against HF measure chaos instead of kernels."""
    generator = None
    for name, param in model.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if "norm" in name:
            param.data.fill_(1.0)
        elif param.dim() == 1:
            param.data.zero_()
        else:
            param.data.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
