"""Mixtral (`MixtralForCausalLM`): Llama's attention (with Mistral's sliding window when the config sets one)
and a mixture of experts on every layer: the router's top `num_experts_per_tok` of `num_local_experts`
experts of width `intermediate_size`, their weights always renormalised to sum to 1. The checkpoint calls
the block `block_sparse_moe` and each expert's gate, down and up projections w1, w2 and w3."""

from __future__ import annotations

from typing import Any

from torch import nn

from scheduler_proc.layers.moe import SparseMoE
from scheduler_proc.models.decoder import LlamaForCausalLM
from scheduler_proc.tp.group import TPGroup


class MixtralForCausalLM(LlamaForCausalLM):
    """Llama's decoder with a SparseMoE layer in place of every MLP."""

    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    def make_mlp(self, config: dict[str, Any], layer_id: int, tp: TPGroup) -> nn.Module:
        return SparseMoE(
            self.shape.hidden_size,
            self.shape.intermediate_size,
            int(config["num_local_experts"]),
            int(config["num_experts_per_tok"]),
            renormalize=True,
            tp=tp,
            projections=("w1", "w3", "w2"),
        )
