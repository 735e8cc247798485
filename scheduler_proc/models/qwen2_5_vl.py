"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the Qwen2 decoder with M-RoPE, fed by the vision
tower. On a step that holds image tokens, the images are encoded (those not yet encoded for their
request) and their embeddings replace the image tokens' rows before the first layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.layers.mrope import MRotaryEmbedding
from scheduler_proc.models.decoder import CausalLM
from scheduler_proc.models.qwen2_5_vision import VisionTower
from scheduler_proc.multimodal import image_embeddings
from scheduler_proc.tp.group import TPGroup

# transformers 5 saves the language model and tower under these names; released checkpoints use the right.
_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class Qwen2_5_VLForConditionalGeneration(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        if tp is not None and tp.size > 1:
            raise ValueError("tp_size: Qwen2.5-VL runs on one device (tp_size=1); its vision tower is not sharded")
        text_config, mrope_section = _text_config(config)
        super().__init__(text_config, qkv_bias=True, tp=tp)
        rotary = MRotaryEmbedding(self.model.layers[0].self_attn.rotary, mrope_section)
        for layer in self.model.layers:
            layer.self_attn.rotary = rotary
        self.visual = VisionTower(config["vision_config"])

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model.embed_tokens(batch.input_ids)
        if batch.image_parts:
            rows, where = image_embeddings(batch.image_parts, self.visual, hidden.device)
            hidden[where] = rows.to(hidden.dtype)
        if batch.rope_positions is not None:  # every layer rotates with these; the KV positions stay as they are
            batch = dataclasses.replace(batch, positions=batch.rope_positions)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def checkpoint_name(self, name: str) -> str:
        for old, new in _RENAMES:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    def checkpoint_shapes(self) -> dict[str, list[int]]:
        """The decoder's checkpoint tensors and the tower's (as our parameters shape them)."""
        tower = {name: list(p.shape) for name, p in self.named_parameters() if name.startswith("visual.")}
        return super().checkpoint_shapes() | tower

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """The decoder's weights as the text model's; the tower's copied by name (the patch embedding's
        Conv3d kernel flattened into our matmul's weight)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def text_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for old, new in _RENAMES:
                    if name.startswith(old):
                        name = new + name[len(old) :]
                if not name.startswith("visual."):
                    yield name, tensor
                    continue
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                target = params[name]
                full = tensor if isinstance(tensor, torch.Tensor) else tensor[:]  # a lazy safetensors slice
                target.data.copy_(full.reshape(target.shape))
                loaded.add(name)

        return loaded | super().load_weights(text_weights())


def _text_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """The decoder's config with plain RoPE settings (the decoder's rotary knows no "mrope" scaling), and
    mrope_section, from either config layout (released checkpoints' rope_scaling or transformers 5's
    rope_parameters)."""
    theta = float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0)))
    section = None
    for key in ("rope_scaling", "rope_parameters"):
        section = section or (config.get(key) or {}).get("mrope_section")
    if section is None:
        raise ValueError("a Qwen2.5-VL config needs mrope_section (in rope_scaling or rope_parameters)")
    text = {k: v for k, v in config.items() if k not in ("rope_scaling", "vision_config")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return text, list(section)
