"""The fused GPU sampling kernel, run here by Triton's CPU interpreter, against the torch sampler's draw."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported: before anything imports it
pytest.importorskip("triton")

import torch  # noqa: E402

from scheduler_proc.fused_sample import fused_sample  # noqa: E402


def _torch_draw(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The sampler's torch path: inverse CDF of softmax(logits / T); argmax where T = 0."""
    greedy = temperature == 0
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


@pytest.mark.parametrize("vocab", [50, 4096, 9001])
def test_same_tokens_as_the_torch_draw(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(24, vocab, generator=gen) * 3).to(torch.bfloat16)
    logits[5, vocab // 2] = 40.0  # one token holds almost all the mass
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.7] * 6)
    uniform = torch.rand(24, generator=gen)
    rows = torch.randperm(24, generator=gen)  # rows of the logits, in another order
    ours = fused_sample(logits, rows, temperature, uniform)
    expected = _torch_draw(logits.float()[rows], temperature, uniform)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected)


def test_greedy_takes_the_first_of_tied_maxima():
    logits = torch.zeros(2, 9000)
    logits[:, [17, 5000, 8999]] = 3.0
    ours = fused_sample(logits, torch.tensor([0, 1]), torch.zeros(2), torch.rand(2))
    assert ours.tolist() == [17, 17]


def test_draws_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]])
    uniform = (torch.arange(400) + 0.5) / 400  # evenly spread: the counts are the probabilities to 1/400
    ours = fused_sample(logits, torch.zeros(400, dtype=torch.int64), torch.ones(400), uniform)
    counts = torch.bincount(ours, minlength=4).float() / 400
    assert torch.allclose(counts, torch.softmax(logits[0], -1), atol=1 / 400)


def test_masked_blocks_are_never_drawn():
    """A grammar mask leaves whole 4096-token blocks at -inf: their mass is zero, not NaN."""
    vocab = 3 * 4096 + 100
    logits = torch.full((8, vocab), float("-inf"))
    allowed = torch.tensor([4096 + 7, 4096 + 3000, 2 * 4096 + 11])
    logits[:, allowed] = torch.randn(8, 3)
    uniform = (torch.arange(8) + 0.5) / 8
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 2)
    ours = fused_sample(logits, torch.arange(8), temperature, uniform)
    assert set(ours.tolist()) <= set(allowed.tolist())
    assert torch.equal(ours, _torch_draw(logits, temperature, uniform))


def test_the_kernels_counter_hash_is_the_samplers():
    """Given seeds and positions, the kernel draws with counter_rng.row_uniform's numbers, bit for bit."""
    from scheduler_proc.counter_rng import row_uniform

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(32, 3000, generator=gen) * 2
    seeds = torch.randint(-(1 << 62), 1 << 62, (32,), generator=gen)
    seeds[:4] = torch.tensor([0, -1, (1 << 63) - 1, -(1 << 63)])  # the edges of int64
    positions = torch.randint(0, 1 << 20, (32,), generator=gen).to(torch.int32)
    temperature = torch.full((32,), 0.8)
    ours = fused_sample(logits, torch.arange(32), temperature, seeds=seeds, positions=positions)
    assert torch.equal(ours, fused_sample(logits, torch.arange(32), temperature, row_uniform(seeds, positions)))
    assert torch.equal(ours, _torch_draw(logits, temperature, row_uniform(seeds, positions)))


@pytest.mark.parametrize("every_row", [False, True])
def test_a_grammar_mask_read_in_the_kernel_equals_the_masked_copy(every_row):
    """The bitmask applied inside the kernel (bits read beside the logits) draws what the sampler drew from a
    float32 copy of the rows masked by apply_token_mask: the grammar's tokens only, no padding id for a
    constrained row, and every token for a free one."""
    from scheduler_proc.grammar_mask import StepMask, apply_token_mask

    gen = torch.Generator().manual_seed(3)
    count, vocab, width = 12, 9001, 9001 + 47  # logits wider than the grammar's vocabulary: padding ids
    logits = (torch.randn(20, width, generator=gen) * 3).to(torch.bfloat16)
    logits[:, vocab:] = 30.0  # padding ids that would win if a constrained row could take them
    allowed = torch.rand(count, vocab, generator=gen) < 0.02
    allowed[0] = False
    allowed[0, [5, 4096, 9000]] = True  # a few tokens in three blocks
    padded = torch.zeros(count, 32 * ((vocab + 31) // 32), dtype=torch.bool)
    padded[:, :vocab] = allowed
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int64)
    bits = (padded.view(count, -1, 32).long() * weights).sum(-1).to(torch.int32)  # xgrammar's layout
    constrained = None if every_row else torch.tensor([True, False, True] * 4)
    rows = torch.randperm(20, generator=gen)[:count]
    temperature = torch.tensor([0.0, 0.8, 1.0] * 4)
    uniform = torch.rand(count, generator=gen)
    ours = fused_sample(logits, rows, temperature, uniform, bits=bits, bits_vocab=vocab, constrained=constrained)
    masked = logits.float()[rows]
    apply_token_mask(masked, StepMask(bits, vocab, constrained))
    assert torch.equal(ours, _torch_draw(masked, temperature, uniform))
    on = torch.ones(count, dtype=torch.bool) if constrained is None else constrained
    for s in range(count):
        token = int(ours[s])
        assert (token < vocab and bool(allowed[s, token])) if on[s] else token >= vocab  # free rows: padding wins


def test_the_first_constrained_step_builds_both_masked_kernels_and_samples_as_the_kernel():
    """The sampler's fused path with a grammar mask: at the first constrained step it also runs the kernel's
    other masked variant on one row (so no later step waits for Triton), then draws what the kernel draws."""
    from engine.shared.sampling import SamplingParams
    from scheduler_proc.grammar_mask import StepMask
    from scheduler_proc.sampler import SamplingBatch, SamplingState

    vocab = 300
    state = SamplingState(4, vocab, torch.device("cpu"))
    for row in range(4):
        state.admit(row, SamplingParams(temperature=0.0 if row == 0 else 0.9), seed=row, prompt_ids=[0])
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, vocab, generator=gen)
    bits = torch.randint(-(1 << 31), 1 << 31, (4, (vocab + 31) // 32), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32)
    mask = StepMask(bits, vocab - 20, torch.tensor([True, False, True, True]))
    batch = SamplingBatch(
        rows=torch.tensor([2, 0, 3, 1]),
        positions=torch.tensor([7, 8, 9, 10]),
        logit_index=torch.tensor([5, 1, 2, 0]),
        all_greedy=False,
        any_penalty=False,
        any_filter=False,
        grammar_mask=mask,
    )
    assert not state._masked_kernels_built
    ours = state._fused(logits, batch.logit_index, batch, mask)
    assert state._masked_kernels_built
    rows = batch.rows
    expected = fused_sample(
        logits,
        batch.logit_index,
        state.temperature[rows],
        seeds=state.seed[rows],
        positions=batch.positions,
        bits=bits,
        bits_vocab=vocab - 20,
        constrained=mask.constrained,
    )
    assert torch.equal(ours, expected)
