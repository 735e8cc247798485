"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): Qwen3's attention (per-head q/k RMSNorm), and in
place of the dense MLP a mixture of experts on every `decoder_sparse_step`-th layer not listed in
`mlp_only_layers`: the router's top `num_experts_per_tok` of `num_experts` experts of width
`moe_intermediate_size`, their weights renormalised to sum to 1 when `norm_topk_prob`."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from scheduler_proc.layers.moe import SparseMoE
from scheduler_proc.models.decoder import MLP, CausalLM
from scheduler_proc.tp.group import TPGroup


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3's decoder with SparseMoE layers where the config puts them."""

    def __init__(self, config: dict[str, Any], tp: Optional[TPGroup] = None) -> None:
        super().__init__(config, qk_norm=True, tp=tp)

    def make_mlp(self, config: dict[str, Any], layer_id: int, tp: TPGroup) -> nn.Module:
        num_experts = num_experts_of(config)
        sparse_step = int(config.get("decoder_sparse_step", 1))
        dense = layer_id in (config.get("mlp_only_layers") or []) or (layer_id + 1) % sparse_step != 0
        if num_experts == 0 or dense:
            return MLP(self.shape, tp)
        return SparseMoE(
            self.shape.hidden_size,
            int(config["moe_intermediate_size"]),
            num_experts,
            int(config["num_experts_per_tok"]),
            renormalize=bool(config.get("norm_topk_prob", False)),
            tp=tp,
        )


def num_experts_of(config: dict[str, Any]) -> int:
    """Released configs say num_experts; transformers 5 saves the same number as num_local_experts."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)
