"""The mixture-of-experts layer: HF's routing, the fused GPU path (run by Triton's CPU interpreter) against the
per-expert loop, each rank's slice of the experts, and a Qwen3-MoE model's logits against HF at tp_size=1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it

import torch  # noqa: E402
from reference import tiny_model_dir  # noqa: E402

from engine.shared.args import EngineArgs, read_model_config  # noqa: E402
from scheduler_proc.layers.moe import expert_loop, route  # noqa: E402
from scheduler_proc.loader import build_model  # noqa: E402
from scheduler_proc.tp.group import TPGroup  # noqa: E402

QWEN3_MOE = {
    "head_dim": 16,
    "num_hidden_layers": 4,
    "num_experts": 8,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 32,
    "decoder_sparse_step": 2,  # layers 1 and 3 sparse ...
    "mlp_only_layers": [3],  # ... but 3 dense after all
}


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory, default_model_path) -> str:
    return tiny_model_dir(tmp_path_factory.mktemp("moe"), "qwen3_moe", default_model_path, **QWEN3_MOE)


@pytest.mark.parametrize("renormalize", [False, True])
def test_routing_is_hfs(renormalize):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=renormalize)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 16)
    _, hf_weights, hf_ids = router(x)
    weights, ids = route(x @ router.weight.T, 3, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 dot is broken
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (7, 4, 2), (40, 16, 4), (130, 8, 8)])
def test_fused_experts_equal_the_per_expert_loop(tokens, experts, top_k, dtype):
    pytest.importorskip("triton")
    from scheduler_proc.layers.fused_moe import fused_experts

    gen = torch.Generator().manual_seed(tokens)
    hidden, inter = 48, 40  # not multiples of the kernel's 64-wide blocks: the edges are masked
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    weights, ids = route(torch.randn(tokens, experts, generator=gen), top_k, renormalize=tokens % 2 == 0)
    ours = fused_experts(x, w13, w2, weights, ids)
    expected = expert_loop(x.float(), w13.float(), w2.float(), weights, ids)
    assert ours.dtype == dtype and ours.shape == x.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, rtol=tolerance, atol=tolerance)


def test_aligned_tiles_hold_one_expert_each():
    from scheduler_proc.layers.fused_moe import align_pairs

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 3]])
    sorted_pairs, tile_expert, num_padded = align_pairs(ids, num_experts=5, block_m=4)
    flat = ids.flatten()
    used = sorted_pairs[: int(num_padded)].view(-1, 4)
    assert int(num_padded) == 4 + 4 + 4 + 8  # experts 0, 1, 2 hold 2, 2, 1 pairs (one tile each), 3 holds 5 (two)
    for tile, expert in zip(used, tile_expert):
        real = tile[tile < flat.numel()].long()
        assert real.numel() and torch.all(flat[real] == expert)
    assert sorted(sorted_pairs[sorted_pairs < flat.numel()].tolist()) == list(range(flat.numel()))


def test_each_rank_holds_its_slice_of_every_expert(qwen3_moe_dir):
    config = read_model_config(qwen3_moe_dir)

    def build(rank: int, size: int):
        return build_model(config, "auto", qwen3_moe_dir, torch.float32, torch.device("cpu"), 0, TPGroup(rank, size))

    full, shards = build(0, 1), [build(rank, 2) for rank in range(2)]
    moe = full.model.layers[1].mlp
    parts = [s.model.layers[1].mlp for s in shards]
    (g0, u0), (g1, u1) = (p.w13.chunk(2, dim=1) for p in parts)
    torch.testing.assert_close(torch.cat([torch.cat([g0, g1], 1), torch.cat([u0, u1], 1)], 1), moe.w13)
    torch.testing.assert_close(torch.cat([p.w2 for p in parts], dim=2), moe.w2)
    assert torch.equal(parts[0].gate.weight, moe.gate.weight) and torch.equal(parts[1].gate.weight, moe.gate.weight)
    assert type(full.model.layers[3].mlp).__name__ == "MLP"  # mlp_only_layers


def test_qwen3_moe_logits_equal_hf(qwen3_moe_dir):
    from transformers import AutoModelForCausalLM

    from scheduler_proc.model_runner import ModelRunner

    prompts = [[(7 * i + 3) % 1000 for i in range(37)], [11, 12, 13]]
    args = EngineArgs(model_path=qwen3_moe_dir, device="cpu", max_total_tokens=256, max_running_requests=4)
    runner = ModelRunner(args.resolve())
    logits = _prefill_logits(runner, prompts)
    hf = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def _prefill_logits(runner, prompts: list[list[int]]) -> torch.Tensor:
    from engine.shared.protocol import GenerateRequest
    from engine.shared.sampling import SamplingParams
    from scheduler_proc.request import Request
    from scheduler_proc.step import build_step

    entries = []
    for i, ids in enumerate(prompts):
        req = Request(GenerateRequest(rid=str(i), input_ids=ids, sampling=SamplingParams(max_new_tokens=1)), seed=0)
        req.row = runner.pool.alloc_row()
        entries.append((req, len(ids)))
    step = build_step(entries, runner.pool, [])
    step.batch.logit_rows = torch.arange(sum(len(p) for p in prompts))
    return runner.forward(step.batch)[1]
