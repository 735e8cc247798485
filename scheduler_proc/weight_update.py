"""New weights for a loaded model, on one rank: checked whole before anything changes, then copied into
the parameters' existing storage (CUDA graphs keep pointers to it), each rank taking its shard the way
the loader does (CausalLM.load_weights with checkpoint names).

Sources are checkpoint (Hugging Face) named tensors of any floating dtype (cast to the model's; FP8
layers re-quantize them, see layers/fp8_linear.py), or a folder of safetensors; FP8 tensors are refused.
A bad update (an unknown name, a wrong shape or dtype, a folder that is not a checkpoint of this model)
is refused before the first copy, with a message naming what is wrong.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from engine.shared.args import read_model_config
from scheduler_proc.layers.kernels import LinearKernel
from scheduler_proc.loader import iter_safetensors
from scheduler_proc.models.decoder import CausalLM

# safetensors' names of the floating dtypes a checkpoint may hold
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class UpdateRefused(ValueError):
    """An update that does not fit the model; nothing was changed."""


@dataclass(frozen=True)
class WeightSpec:
    """What an update says of one tensor before its values are read."""

    name: str
    shape: list[int]
    dtype: torch.dtype


def check_update(model: CausalLM, specs: list[WeightSpec], complete: bool = False) -> None:
    """Raise UpdateRefused unless every spec names one of the model's checkpoint tensors with its
    shape and a floating dtype; `complete`: every tensor of the model must be there."""
    shapes = model.checkpoint_shapes()
    seen = set()
    for spec in specs:
        if not spec.dtype.is_floating_point:
            raise UpdateRefused(f"weight {spec.name!r} has dtype {spec.dtype}; weights must be floating point")
        if spec.dtype.itemsize == 1:  # FP8 without its scale: send high precision, FP8 layers re-quantize it
            raise UpdateRefused(f"weight {spec.name!r} has dtype {spec.dtype}; send bf16/fp16/fp32 weights")
        if _skipped(model, spec.name):
            continue
        key = model.checkpoint_name(spec.name)
        expected = shapes.get(key)
        if expected is None:
            raise UpdateRefused(f"{type(model).__name__} has no weight named {spec.name!r}")
        # The vision tower's patch embedding is a Conv3d kernel in checkpoints and flattened here.
        reshaped = key.startswith("visual.") and math.prod(spec.shape) == math.prod(expected)
        if list(spec.shape) != expected and not reshaped:
            raise UpdateRefused(f"weight {spec.name!r} has shape {list(spec.shape)}; the model's is {expected}")
        seen.add(key)
    missing = sorted(set(shapes) - seen) if complete else []
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise UpdateRefused(f"the update lacks weights for {missing[:5]}{more}")


def load_checked(model: CausalLM, weights: Iterable[tuple[str, Any]]) -> int:
    """Copy checked weights into the model; returns how many parameters were written."""
    loaded = model.load_weights(weights)
    # CPU matmuls keep a packed copy of each weight; the copies above went through `.data`, unseen by it.
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, LinearKernel):
                value.forget()
    return len(loaded)


def update_from_tensors(model: CausalLM, named: list[tuple[str, torch.Tensor]]) -> int:
    """Check, then load, in-memory tensors (any subset of the model's weights)."""
    check_update(model, [WeightSpec(name, list(t.shape), t.dtype) for name, t in named])
    return load_checked(model, named)


def update_from_disk(model: CausalLM, config: dict[str, Any], model_path: str) -> int:
    """Check a folder's config (against the engine's `config`) and every tensor's header against the
    model, then load all of it."""
    if not os.path.isdir(model_path):
        raise UpdateRefused(f"model_path {model_path!r} is not a folder")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UpdateRefused(f"model_path {model_path!r} has no config.json")
    theirs, ours = _attention_layout(read_model_config(model_path)), _attention_layout(config)
    if theirs != ours:
        raise UpdateRefused(f"model_path {model_path!r} holds another model: {theirs}; the engine's is {ours}")
    if not glob.glob(os.path.join(model_path, "*.safetensors")):
        raise UpdateRefused(f"model_path {model_path!r} holds no *.safetensors weights")
    check_update(model, safetensors_specs(model_path), complete=True)
    return load_checked(model, iter_safetensors(model_path))


def safetensors_specs(model_path: str) -> list[WeightSpec]:
    """Name, shape and dtype of every tensor in a folder's safetensors files, from their headers."""
    specs = []
    for name, source in iter_safetensors(model_path):
        kind = source.get_dtype()
        dtype = _SAFETENSORS_FLOATS.get(kind)
        if dtype is None:
            raise UpdateRefused(f"weight {name!r} in {model_path} has dtype {kind}; weights must be floating point")
        specs.append(WeightSpec(name, list(source.get_shape()), dtype))
    return specs


def _attention_layout(config: dict[str, Any]) -> dict[str, Any]:
    """What two checkpoints of one model share beyond their tensors' shapes."""
    heads = int(config.get("num_attention_heads") or 0)
    return {
        "architecture": (config.get("architectures") or [None])[0],
        "num_attention_heads": heads,
        "num_key_value_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or int(config.get("hidden_size") or 0) // max(heads, 1)),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


def _skipped(model: CausalLM, name: str) -> bool:
    """Checkpoint tensors load_weights passes over: rotary tables, and a tied LM head (the embedding is it)."""
    return "rotary_emb" in name or (name == "lm_head.weight" and model.shape.tie_word_embeddings)
