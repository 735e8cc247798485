"""The Llama-family decoder (Llama, Qwen2, Qwen3): attention and MLP blocks threaded with a residual.

The three architectures differ only in switches read from config.json: q/k/v bias (Qwen2, or Llama's
`attention_bias`), per-head q/k RMSNorm (Qwen3) and an explicit `head_dim` (Qwen3).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from scheduler_proc.batch import ForwardBatch
from scheduler_proc.layers.activation import SiluAndMul
from scheduler_proc.layers.linear import Linear, MergedLinear
from scheduler_proc.layers.norm import RMSNorm
from scheduler_proc.layers.rotary import RotaryEmbedding, rope_parameters


class ModelShape:
    """The numbers of a decoder read once from config.json."""

    def __init__(self, config: dict[str, Any], qkv_bias: bool, qk_norm: bool) -> None:
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.num_kv_heads = int(config.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(config.get("head_dim") or self.hidden_size // self.num_heads)
        self.intermediate_size = int(config["intermediate_size"])
        self.vocab_size = int(config["vocab_size"])
        self.rms_norm_eps = float(config.get("rms_norm_eps", 1e-6))
        self.max_positions = int(config.get("max_position_embeddings", 4096))
        self.tie_word_embeddings = bool(config.get("tie_word_embeddings", False))
        self.rope_theta, self.rope_scaling = rope_parameters(config)
        self.qkv_bias = qkv_bias or bool(config.get("attention_bias", False))
        self.qk_norm = qk_norm
        self.mlp_bias = bool(config.get("mlp_bias", False))


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(shape.hidden_size, [q_size, kv_size, kv_size], bias=shape.qkv_bias)
        self.o_proj = Linear(q_size, shape.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.rotary = rotary
        self.split = [q_size, kv_size, kv_size]

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.split, dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        else:
            q, k = q.contiguous(), k.contiguous()
        self.rotary(batch.positions, q, k)
        out = batch.attention.forward(q, k, v.contiguous(), self.layer_id)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        size = shape.intermediate_size
        self.gate_up_proj = MergedLinear(shape.hidden_size, [size, size], bias=shape.mlp_bias)
        self.down_proj = Linear(size, shape.hidden_size, bias=shape.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, layer_id, rotary)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(
        self, hidden: torch.Tensor, residual: Optional[torch.Tensor], batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        rotary = RotaryEmbedding(shape.head_dim, shape.max_positions, shape.rope_theta, shape.rope_scaling)
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, i, rotary) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns the final-normed hidden states of every input token."""

    def __init__(self, config: dict[str, Any], qkv_bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.shape = ModelShape(config, qkv_bias, qk_norm)
        self.model = DecoderModel(self.shape)
        self.lm_head = Linear(self.shape.hidden_size, self.shape.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after to_empty())."""
        if self.shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the fused parameters; returns the names of parameters filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # fmt: skip
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.shape.tie_word_embeddings:
                continue
            *path, proj, kind = name.split(".")
            if proj in fused:
                target, index = fused[proj]
                module = self.get_submodule(".".join(path + [target]))
                module.load_shard(index, kind, tensor)
                loaded.add(".".join(path + [target, kind]))
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config, qkv_bias=True)


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config, qk_norm=True)


ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
