"""scripts/peer_shim: the routing ops that let mini-sglang run Qwen3-MoE on the device, against a plain loop
over the layout its fused MoE kernel reads (slots grouped by expert in slot order, each group padded to
whole blocks with the slot count, one expert per block)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "peer_shim"))
from sgl_kernel import moe_align_block_size, topk_softmax  # noqa: E402


def _expected(ids: list[int], experts: int, block: int) -> tuple[list[int], list[int]]:
    sorted_ids, expert_of_block = [], []
    for expert in range(experts):
        group = [slot for slot, e in enumerate(ids) if e == expert]
        group += [len(ids)] * (-len(group) % block)
        sorted_ids += group
        expert_of_block += [expert] * (len(group) // block)
    return sorted_ids, expert_of_block


@pytest.mark.parametrize("tokens,topk,experts,block", [(1, 8, 128, 16), (37, 8, 129, 16), (256, 2, 9, 64)])
def test_align_groups_slots_by_expert_in_whole_blocks(tokens, topk, experts, block):
    gen = torch.Generator().manual_seed(tokens)
    topk_ids = torch.stack([torch.randperm(experts - 1, generator=gen)[:topk] for _ in range(tokens)]).int()
    capacity = topk_ids.numel() + experts * (block - 1)
    sorted_ids = torch.full((capacity,), -7, dtype=torch.int32)
    expert_ids = torch.full((-(-capacity // block),), -7, dtype=torch.int32)
    total, cumsum = torch.zeros(1, dtype=torch.int32), torch.zeros(experts + 1, dtype=torch.int32)
    moe_align_block_size(topk_ids, experts, block, sorted_ids, expert_ids, total, cumsum, True)
    want_ids, want_experts = _expected(topk_ids.flatten().tolist(), experts, block)
    n = len(want_ids)
    assert total.item() == n == cumsum[-1].item()
    assert sorted_ids[:n].tolist() == want_ids and (sorted_ids[n:] == topk_ids.numel()).all()
    assert expert_ids[: n // block].tolist() == want_experts


def test_topk_softmax_renormalizes_the_chosen_experts():
    gating = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    weights, ids = torch.empty(2, 2), torch.empty(2, 2, dtype=torch.int32)
    topk_softmax(weights, ids, gating, True)
    assert ids.tolist() == [[1, 2], [3, 0]]
    probs = gating.softmax(-1)
    assert torch.allclose(weights[0], probs[0, [1, 2]] / probs[0, [1, 2]].sum())
    topk_softmax(weights, ids, gating, False)
    assert torch.allclose(weights[1], probs[1, [3, 0]])
