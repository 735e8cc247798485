"""The Llama-family decoder (Llama, Qwen2, Qwen3): attention and MLP blocks threaded with a residual.

The three architectures differ only in switches read from config.json: q/k/v bias (Qwen2, or Llama's
`attention_bias`), per-head q/k RMSNorm (Qwen3) and an explicit `head_dim` (Qwen3).

Under tensor parallelism (Megatron) each rank holds its share of the attention heads and of the MLP:
column-parallel q|k|v and gate|up, row-parallel o_proj and down_proj (one all-reduce each per layer),
vocab-parallel embedding and LM head. KV heads are split when there are at least tp_size of them, else
each rank keeps the one KV head its query heads read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.layers.activation import SiluAndMul
from scheduler_proc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from scheduler_proc.layers.linear import ColumnParallelLinear, Part, RowParallelLinear, load_whole
from scheduler_proc.layers.norm import RMSNorm
from scheduler_proc.layers.rotary import RotaryEmbedding, rope_parameters
from scheduler_proc.tp.group import TPGroup


class ModelShape:
    """The numbers of a decoder read once from config.json."""

    def __init__(self, config: dict[str, Any], qkv_bias: bool, qk_norm: bool, tp_size: int = 1) -> None:
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
        self.tp_size = tp_size
        self.num_heads_per_rank = self.num_heads // tp_size
        self.num_kv_heads_per_rank = max(1, self.num_kv_heads // tp_size)

    def kv_shard(self, rank: int) -> tuple[int, int]:
        """(number of KV-head blocks, the block this rank keeps): split, or replicated across the
        tp_size / num_kv_heads ranks whose query heads read the same KV head."""
        if self.num_kv_heads >= self.tp_size:
            return self.tp_size, rank
        return self.num_kv_heads, rank * self.num_kv_heads // self.tp_size


class Attention(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads = shape.num_heads_per_rank, shape.num_kv_heads_per_rank
        self.head_dim = shape.head_dim
        q_size, kv_size = shape.num_heads * self.head_dim, shape.num_kv_heads * self.head_dim
        kv_shards, kv_shard = shape.kv_shard(tp.rank)
        parts = [
            Part("q_proj", q_size, tp.size, tp.rank),
            Part("k_proj", kv_size, kv_shards, kv_shard),
            Part("v_proj", kv_size, kv_shards, kv_shard),
        ]
        self.qkv_proj = ColumnParallelLinear(shape.hidden_size, parts, bias=shape.qkv_bias)
        self.o_proj = RowParallelLinear(q_size, shape.hidden_size, bias=False, tp=tp)
        self.q_norm = RMSNorm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.rotary = rotary
        self.split = [p.local_size for p in parts]

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
    def __init__(self, shape: ModelShape, tp: TPGroup) -> None:
        super().__init__()
        size = shape.intermediate_size
        parts = [Part("gate_proj", size, tp.size, tp.rank), Part("up_proj", size, tp.size, tp.rank)]
        self.gate_up_proj = ColumnParallelLinear(shape.hidden_size, parts, bias=shape.mlp_bias)
        self.down_proj = RowParallelLinear(size, shape.hidden_size, bias=shape.mlp_bias, tp=tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, layer_id, rotary, tp)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape, tp)

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
    def __init__(self, shape: ModelShape, tp: TPGroup) -> None:
        super().__init__()
        rotary = RotaryEmbedding(shape.head_dim, shape.max_positions, shape.rope_theta, shape.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(shape, i, rotary, tp) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns the final-normed hidden states of every input token."""

    def __init__(
        self, config: dict[str, Any], qkv_bias: bool = False, qk_norm: bool = False, tp: Optional[TPGroup] = None
    ) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.shape = ModelShape(config, qkv_bias, qk_norm, tp.size)
        self.model = DecoderModel(self.shape, tp)
        self.lm_head = ParallelLMHead(self.shape.vocab_size, self.shape.hidden_size, tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after to_empty())."""
        if self.shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """float32 logits [R, vocab]; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Fill the parameters from checkpoint-named sources (safetensors slices or tensors), each
        sharded layer reading only this rank's block; returns the names of the parameters filled."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        fused = self._fused_parts()
        loaded: set[str] = set()
        for name, source in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.shape.tie_word_embeddings):
                continue
            owner, kind = name.rsplit(".", 1)
            if owner in fused:
                module_name, index = fused[owner]
                modules[module_name].load_part(index, kind, source, name)
                loaded.add(f"{module_name}.{kind}")
            elif isinstance(modules.get(owner), _SHARDED):
                modules[owner].load(kind, source, name)
                loaded.add(name)
            elif name in params:
                load_whole(params[name], source, name)
                loaded.add(name)
            else:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        return loaded

    def checkpoint_name(self, name: str) -> str:
        """The name checkpoint_shapes() gives the tensor a checkpoint (or a trainer) calls `name`."""
        return name

    def checkpoint_shapes(self) -> dict[str, list[int]]:
        """Every checkpoint tensor the model reads, by its checkpoint name, with its full (unsharded) shape."""
        shapes: dict[str, list[int]] = {}
        for module_name, module in self.named_modules():
            if module is self.lm_head and self.shape.tie_word_embeddings:
                continue
            if isinstance(module, (ColumnParallelLinear, *_SHARDED)):
                shapes.update(module.checkpoint_shapes(module_name))
                continue
            for param_name, param in module.named_parameters(recurse=False):
                shapes[f"{module_name}.{param_name}"] = list(param.shape)
        return shapes

    def _fused_parts(self) -> dict[str, tuple[str, int]]:
        """Checkpoint module name (model.layers.0.self_attn.k_proj) -> (fused module name, part index)."""
        parts = {}
        for module_name, module in self.named_modules():
            if isinstance(module, ColumnParallelLinear):
                parent = module_name.rsplit(".", 1)[0]
                for index, part in enumerate(module.parts):
                    parts[f"{parent}.{part.name}"] = (module_name, index)
        return parts


_SHARDED = (RowParallelLinear, VocabParallelEmbedding)  # layers with their own `load`


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, tp=tp)


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, qkv_bias=True, tp=tp)


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, qk_norm=True, tp=tp)


ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
