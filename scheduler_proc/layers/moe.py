"""Mixture of experts (Qwen3-MoE, Mixtral): a router picks top_k of num_experts SiLU-gated MLPs for each
token, and the token's output is theirs, weighted by the router's probabilities.

Expert weights are stacked: w13 [E, 2 * I/tp, H] (each expert's gate rows, then its up rows) and
w2 [E, H, I/tp]. Under tensor parallelism every rank keeps every expert's slice of the intermediate
dimension (Megatron's MLP split: column-parallel gate|up, row-parallel down), and the ranks' partial
outputs are summed by one all-reduce; the router is replicated. On CUDA the experts run as two grouped
GEMMs over the routed tokens (layers/fused_moe.py, Triton); on CPU, and as the reference the fused path
is measured against, `expert_loop` runs one matmul pair per expert that has tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.linear import read_block
from scheduler_proc.tp.group import TPGroup


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): the top_k of softmax(logits), as HF transformers
    routes; renormalize: the k weights sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_loop(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """The experts one by one: each gathers its tokens, runs its MLP and adds the weighted result."""
    out = torch.zeros_like(x)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # a host sync: never on the GPU's hot path
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // ids.shape[1]
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * weights.flatten()[pairs, None]
        out.index_add_(0, tokens, y.to(x.dtype))
    return out


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP block; `projections` are the checkpoint's names of each expert's gate, up
    and down projections (experts.{e}.{name}.weight)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        tp: TPGroup,
        projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp, self.projections = tp, projections
        self.local_size = intermediate_size // tp.size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if x.is_cuda:
            from scheduler_proc.layers.fused_moe import fused_experts

            out = fused_experts(x, self.w13, self.w2, weights, ids)
        else:
            out = expert_loop(x, self.w13, self.w2, weights, ids)
        return self.tp.all_reduce(out)

    def load_expert(self, expert: int, projection: str, source: Any, name: str) -> str:
        """This rank's slice of one expert's projection; returns the parameter it went into."""
        gate, up, down = self.projections
        size, local, start = self.intermediate_size, self.local_size, self.tp.rank * self.local_size
        if projection in (gate, up):
            block = read_block(source, name, [size, self.hidden_size], 0, start, start + local)
            offset = 0 if projection == gate else local
            self.w13.data[expert, offset : offset + local].copy_(block)
            return "w13"
        if projection == down:
            self.w2.data[expert].copy_(read_block(source, name, [self.hidden_size, size], 1, start, start + local))
            return "w2"
        raise KeyError(f"checkpoint tensor {name!r}: expert projection {projection!r} is not one of {self.projections}")

    def checkpoint_shapes(self, name: str) -> dict[str, list[int]]:
        """Each expert's projections by checkpoint name, full size (the router is a plain parameter)."""
        gate, up, down = self.projections
        full, hidden = self.intermediate_size, self.hidden_size
        shapes = {}
        for e in range(self.num_experts):
            shapes[f"{name}.experts.{e}.{gate}.weight"] = [full, hidden]
            shapes[f"{name}.experts.{e}.{up}.weight"] = [full, hidden]
            shapes[f"{name}.experts.{e}.{down}.weight"] = [hidden, full]
        shapes[f"{name}.gate.weight"] = [self.num_experts, hidden]
        return shapes
