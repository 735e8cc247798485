"""The two routing ops of `sgl_kernel` that mini-sglang's fused MoE layer imports, in torch, so that the peer
can run Qwen3-MoE on the device: the real package is a 535 MB wheel built for torch 2.9.1, and a device
call carries 64 MiB to a machine with torch 2.11 and no package index.

Only the routing is replaced: the expert GEMMs stay the peer's own Triton kernels. Both ops are written
without a host synchronisation, so the peer captures them in its CUDA graphs as it would the real ones.
A comparison that uses this module says so (docs/benchmarks.md). The layout they produce is the one
the peer's `fused_moe_kernel` reads: tests/test_peer_shim.py checks it against a plain loop.
"""

from __future__ import annotations

import torch


def topk_softmax(topk_weights: torch.Tensor, topk_ids: torch.Tensor, gating: torch.Tensor, renormalize: bool) -> None:
    """Softmax over the experts, the top k of each row into topk_weights (float32) and topk_ids (int32)."""
    weights, ids = gating.float().softmax(dim=-1).topk(topk_ids.shape[1], dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    topk_weights.copy_(weights)
    topk_ids.copy_(ids)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    cumsum_buffer: torch.Tensor,
    pad_sorted_ids: bool = True,
) -> None:
    """The routed (token, choice) slots grouped by expert, each expert's group padded to whole blocks:
    sorted_ids holds the flat slot indices (padding: the number of slots), expert_ids each block's expert,
    num_tokens_post_pad the padded total, cumsum_buffer the experts' padded starts and the total."""
    ids = topk_ids.flatten().long()
    slots = ids.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_size - 1) // block_size * block_size
    ends = padded.cumsum(0)
    order = torch.argsort(ids, stable=True)  # slots by expert, each expert's in slot order
    by_expert = ids[order]
    rank = torch.arange(slots, device=ids.device) - (counts.cumsum(0) - counts)[by_expert]
    if pad_sorted_ids:
        sorted_ids.fill_(slots)
    sorted_ids[(ends - padded)[by_expert] + rank] = order.to(sorted_ids.dtype)
    num_tokens_post_pad.copy_(ends[-1:])
    cumsum_buffer[:1].zero_()  # no host scalar: the call is captured in CUDA graphs
    cumsum_buffer[1 : num_experts + 1].copy_(ends)
    block_starts = torch.arange(expert_ids.numel(), device=ids.device) * block_size
    expert_ids.copy_(torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1))
