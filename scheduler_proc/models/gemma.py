"""Gemma 2 and Gemma 3 (text): `Gemma2ForCausalLM`, `Gemma3ForCausalLM`.

As Llama, with: RMSNorm scaling by (1 + weight), in float32; the embedding multiplied by sqrt(hidden_size)
(rounded to the model's dtype, as HF does); a GELU-gated MLP (tanh approximation); a norm after attention
and another around the MLP (four per layer); q.k scaled by query_pre_attn_scalar ** -0.5; local layers
with a sliding window between global ones (Gemma 2: every other layer; Gemma 3: five in six). Gemma 2
soft-caps attention scores and the final logits (cap * tanh(x / cap)); Gemma 3 normalises q and k per
head instead and rotates local layers with their own RoPE base (rope_local_base_freq, 10k) and global
ones with rope_theta (1M, and the config's scaling). Embeddings are tied to the LM head by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from engine.shared.model_config import layer_windows
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.layers.activation import GeluTanhAndMul
from scheduler_proc.layers.embedding import VocabParallelEmbedding
from scheduler_proc.layers.norm import GemmaRMSNorm
from scheduler_proc.layers.rotary import RotaryEmbedding, rope_parameters
from scheduler_proc.models.decoder import MLP, Attention, CausalLM, ModelShape
from scheduler_proc.tp.group import TPGroup


class GemmaDecoderLayer(nn.Module):
    """Attention and MLP, each between two norms (Gemma's "sandwich"), threaded with a residual."""

    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        size, eps = shape.hidden_size, shape.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Attention(shape, layer_id, rotary, tp, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = MLP(shape, tp, act=GeluTanhAndMul())
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) in and out: the residual stream is residual + hidden, added in each fused norm."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, batch))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    """The scaled embedding, the layers (each with the rotary of its kind) and the final norm."""

    def __init__(self, shape: ModelShape, tp: TPGroup, rotary_for: Callable[[int], RotaryEmbedding]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp)
        self.layers = nn.ModuleList(GemmaDecoderLayer(shape, i, rotary_for(i), tp) for i in range(shape.num_layers))
        self.norm = GemmaRMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.normalizer = shape.hidden_size**0.5

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)
        hidden = hidden * torch.tensor(self.normalizer, dtype=hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(CausalLM):
    """Gemma 2: soft-capped attention scores and final logits, one RoPE base for every layer."""

    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None, qk_norm: bool = False) -> None:
        super().__init__({"tie_word_embeddings": True, **config}, qk_norm=qk_norm, tp=tp)
        softcap = config.get("final_logit_softcapping")
        self.final_softcap = float(softcap) if softcap is not None else None

    def make_model(self, config: dict[str, Any], tp: TPGroup) -> nn.Module:
        rotary = _rotary(self.shape, *rope_parameters(config))
        return GemmaModel(self.shape, tp, lambda layer_id: rotary)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        logits = super().compute_logits(hidden)
        if logits is None or self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 (text): per-head q/k norms; local and global layers rotate with their own RoPE."""

    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, tp=tp, qk_norm=True)

    def make_model(self, config: dict[str, Any], tp: TPGroup) -> nn.Module:
        local = _rotary(self.shape, *_gemma3_rope(config, "sliding_attention"))
        full = _rotary(self.shape, *_gemma3_rope(config, "full_attention"))
        windows = layer_windows(config)
        return GemmaModel(self.shape, tp, lambda layer_id: local if windows[layer_id] is not None else full)


def _rotary(shape: ModelShape, theta: float, scaling: Optional[dict[str, Any]]) -> RotaryEmbedding:
    return RotaryEmbedding(shape.head_dim, shape.max_positions, theta, scaling)


def _gemma3_rope(config: dict[str, Any], layer_type: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(theta, scaling) of one layer type: transformers 5 gives a rope_parameters dict per layer type;
    released configs give rope_local_base_freq for local layers and rope_theta + rope_scaling for global."""
    params = (config.get("rope_parameters") or {}).get(layer_type)
    if isinstance(params, dict):
        kind = params.get("rope_type") or params.get("type") or "default"
        return float(params.get("rope_theta", 10000.0)), (params if kind != "default" else None)
    if layer_type == "sliding_attention":
        return float(config.get("rope_local_base_freq", 10000.0)), None
    return rope_parameters(config)
