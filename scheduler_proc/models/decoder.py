"""The Llama-family decoder (Llama, Mistral, Phi-3, Qwen2, Qwen3): attention and MLP blocks threaded with
a residual; the shared blocks of the other families' model files (mixture-of-experts, Gemma).

The architectures here differ only in switches read from config.json: q/k/v bias (Qwen2, or Llama's
`attention_bias`), per-head q/k RMSNorm (Qwen3), an explicit `head_dim` (Qwen3), each layer's sliding
window (Mistral, Phi-3, Qwen with `use_sliding_window`), and Phi-3's fused q|k|v and gate|up tensors in the
checkpoint (loaded into the same fused layers the others fill part by part).

Under tensor parallelism (Megatron) each rank holds its share of the attention heads and of the MLP:
column-parallel q|k|v and gate|up, row-parallel o_proj and down_proj (one all-reduce each per layer),
vocab-parallel embedding and LM head. KV heads are split when there are at least tp_size of them, else
each rank keeps the one KV head its query heads read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

from engine.shared.model_config import layer_windows
from scheduler_proc.attention.base import LayerAttention
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.layers.activation import SiluAndMul
from scheduler_proc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from scheduler_proc.layers.fp8_linear import takes_fp8_rows
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
        self.layer_windows = layer_windows(config)
        # Gemma: q.k scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5, scores soft-capped.
        scalar = config.get("query_pre_attn_scalar")
        self.attention_scale = float(scalar) ** -0.5 if scalar is not None else None
        softcap = config.get("attn_logit_softcapping")
        self.attention_softcap = float(softcap) if softcap is not None else None

    def layer_attention(self) -> list[LayerAttention]:
        """Each layer's window, scale and soft cap, for the attention backend."""
        return [LayerAttention(w, self.attention_scale, self.attention_softcap) for w in self.layer_windows]

    def kv_shard(self, rank: int) -> tuple[int, int]:
        """(number of KV-head blocks, the block this rank keeps): split, or replicated across the
        tp_size / num_kv_heads ranks whose query heads read the same KV head."""
        if self.num_kv_heads >= self.tp_size:
            return self.tp_size, rank
        return self.num_kv_heads, rank * self.num_kv_heads // self.tp_size


class Attention(nn.Module):
    def __init__(
        self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup, norm: type[RMSNorm] = RMSNorm
    ) -> None:
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
        self.q_norm = norm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = norm(self.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.rotary = rotary
        # On the GPU, Qwen3's per-head norms and RoPE run as one kernel (layers/qk_norm_rope.py: its halves
        # are Triton blocks, so a power-of-two head size); Gemma's (1 + w) norm keeps the separate kernels.
        dim = self.head_dim
        self.fused_qk_norm_rope = shape.qk_norm and norm is RMSNorm and dim >= 16 and dim & (dim - 1) == 0
        self.split = [p.local_size for p in parts]

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q, k and v stay views into the projection's output: norms and RoPE work on them in place and
        # attention reads them strided, so no copy is made (three kernels a layer fewer).
        q, k, v = self.qkv_proj(hidden).split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.fused_qk_norm_rope and q.is_cuda:
            from scheduler_proc.layers.qk_norm_rope import qk_norm_rope  # imports triton: GPU only

            weights = (self.q_norm.weight, self.k_norm.weight)
            qk_norm_rope(q, k, batch.positions, self.rotary.cos_sin_cache, *weights, self.q_norm.eps)
        else:
            if self.q_norm is not None:
                self.q_norm.forward_inplace(q)
                self.k_norm.forward_inplace(k)
            self.rotary(batch.positions, q, k)
        return self.o_proj(batch.attention.forward(q, k, v, self.layer_id))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SiLU, or the activation given (Gemma's tanh GELU)."""

    def __init__(self, shape: ModelShape, tp: TPGroup, act: Optional[nn.Module] = None) -> None:
        super().__init__()
        size = shape.intermediate_size
        parts = [Part("gate_proj", size, tp.size, tp.rank), Part("up_proj", size, tp.size, tp.rank)]
        self.gate_up_proj = ColumnParallelLinear(shape.hidden_size, parts, bias=shape.mlp_bias)
        self.down_proj = RowParallelLinear(size, shape.hidden_size, bias=shape.mlp_bias, tp=tp)
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, layer_id, rotary, tp)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = mlp  # a dense MLP, or a mixture of experts (layers/moe.py)

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

    def feed_fp8_projections(self) -> None:
        """Where an FP8 projection reads a norm's or the activation's output alone, let that kernel write it
        quantized (fp8_quant_kernel.py): one pass over the activations fewer. After the weights load."""
        if type(self.input_layernorm) is RMSNorm:  # Gemma's (1 + w) norm has no fused kernel
            self.input_layernorm.out_fp8 = takes_fp8_rows(self.self_attn.qkv_proj)
        if not isinstance(self.mlp, MLP):  # a mixture of experts: its experts stay in the model's dtype
            return
        if type(self.post_attention_layernorm) is RMSNorm:
            self.post_attention_layernorm.out_fp8 = takes_fp8_rows(self.mlp.gate_up_proj)
        if type(self.mlp.act) is SiluAndMul:
            self.mlp.act.out_fp8 = takes_fp8_rows(self.mlp.down_proj)


class DecoderModel(nn.Module):
    def __init__(self, shape: ModelShape, tp: TPGroup, mlp_for: Callable[[int], nn.Module]) -> None:
        super().__init__()
        rotary = RotaryEmbedding(shape.head_dim, shape.max_positions, shape.rope_theta, shape.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(shape.vocab_size, shape.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(shape, i, rotary, tp, mlp_for(i)) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """Decoder + LM head. forward() returns the final-normed hidden states of every input token.

    A family's model file overrides make_mlp (mixture-of-experts layers) or make_model (another layer
    shape), and lists checkpoint_renames (its checkpoint's names -> ours) where they differ."""

    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __init__(
        self, config: dict[str, Any], qkv_bias: bool = False, qk_norm: bool = False, tp: Optional[TPGroup] = None
    ) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.shape = ModelShape(config, qkv_bias, qk_norm, tp.size)
        self.model = self.make_model(config, tp)
        self.lm_head = ParallelLMHead(self.shape.vocab_size, self.shape.hidden_size, tp)
        self.kv_scales: dict[int, list[float]] = {}  # layer -> [k_scale, v_scale] of an FP8 KV cache, if given
        self.tie_weights()

    def make_model(self, config: dict[str, Any], tp: TPGroup) -> nn.Module:
        return DecoderModel(self.shape, tp, lambda layer_id: self.make_mlp(config, layer_id, tp))

    def make_mlp(self, config: dict[str, Any], layer_id: int, tp: TPGroup) -> nn.Module:
        return MLP(self.shape, tp)

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after to_empty())."""
        if self.shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def compute_logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits [R, vocab] in the model's dtype; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Fill the parameters from checkpoint-named sources (safetensors slices or tensors), each
        sharded layer reading only this rank's block; returns the names of the parameters filled."""
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        fused = self._fused_parts()
        loaded: set[str] = set()
        for name, source in weights:
            name = self._our_name(name)
            if "rotary_emb" in name or (name == "lm_head.weight" and self.shape.tie_word_embeddings):
                continue
            owner, kind = name.rsplit(".", 1)
            if self._load_kv_scale(owner, kind, source):
                continue
            if ".experts." in owner:  # model.layers.0.mlp.experts.7.up_proj: one expert's projection
                moe, expert = owner.split(".experts.", 1)
                index, projection = expert.split(".", 1)
                loaded.add(f"{moe}.{modules[moe].load_expert(int(index), projection, source, name)}")
            elif owner in fused:
                module_name, index = fused[owner]
                written = modules[module_name].load_part(index, kind, source, name)
                loaded.update(f"{module_name}.{param}" for param in written)
            elif isinstance(modules.get(owner), ColumnParallelLinear):  # all parts in one tensor (Phi-3)
                loaded.update(f"{owner}.{param}" for param in modules[owner].load_fused(kind, source, name))
            elif isinstance(modules.get(owner), RowParallelLinear):
                loaded.update(f"{owner}.{param}" for param in modules[owner].load(kind, source, name))
            elif isinstance(modules.get(owner), VocabParallelEmbedding):
                modules[owner].load(kind, source, name)
                loaded.add(name)
            elif name in params:
                load_whole(params[name], source, name)
                loaded.add(name)
            else:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        return loaded

    def _our_name(self, name: str) -> str:
        """A checkpoint tensor's name in this model."""
        for old, new in self.checkpoint_renames:
            name = name.replace(old, new)
        if name.startswith(_BARE_DECODER):  # saved from the bare decoder (AutoModel), as embedding models are
            name = "model." + name
        return name

    def _load_kv_scale(self, owner: str, kind: str, source: Any) -> bool:
        """An FP8 checkpoint's scale of a layer's keys or values in the KV cache (self_attn.k_scale, or
        k_proj.output_scale): kept in kv_scales for the KV pool; False when the name is none of these."""
        names = {"k_scale": 0, "v_scale": 1, "k_proj.output_scale": 0, "v_proj.output_scale": 1}
        layer, _, rest = owner.partition(".self_attn")
        which = names.get(kind if rest == "" else f"{rest.lstrip('.')}.{kind}")
        if which is None or not layer.startswith("model.layers."):  # (cheap: most names stop here)
            return False
        layer_id = int(layer.rsplit(".", 1)[1])
        scales = self.kv_scales.setdefault(layer_id, [1.0, 1.0])
        scales[which] = float(source[...].reshape(-1)[0])
        return True

    def checkpoint_name(self, name: str) -> str:
        """The name checkpoint_shapes() gives the tensor a checkpoint (or a trainer) calls `name`."""
        return name

    def checkpoint_shapes(self) -> dict[str, list[int]]:
        """Every checkpoint tensor the model reads, by its checkpoint name, with its full (unsharded) shape."""
        shapes: dict[str, list[int]] = {}
        for module_name, module in self.named_modules():
            if module is self.lm_head and self.shape.tie_word_embeddings:
                continue
            if module is not self and hasattr(module, "checkpoint_shapes"):  # sharded layers, experts
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


_BARE_DECODER = ("layers.", "embed_tokens.", "norm.")


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, tp=tp)


class Qwen2ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, qkv_bias=True, tp=tp)


class Qwen3ForCausalLM(CausalLM):
    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, qk_norm=True, tp=tp)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding window on every layer (when its config sets one)."""


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama in the layers; fused q|k|v and gate|up tensors in the checkpoint, LongRoPE scaling
    (layers/rotary.py) and a sliding window on every layer (when its config sets one)."""


ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
