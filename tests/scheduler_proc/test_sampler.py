"""The batched sampler's randomness: the right distribution, and a row's draw independent of its batch."""

from __future__ import annotations

import torch

from engine.shared.sampling import SamplingParams
from scheduler_proc.sampler import SamplingBatch, SamplingState


def _batch(rows: list[int], positions: list[int], any_filter: bool = False) -> SamplingBatch:
    return SamplingBatch(
        rows=torch.tensor(rows),
        positions=torch.tensor(positions),
        logit_index=torch.arange(len(rows)),
        all_greedy=False,
        any_penalty=False,
        any_filter=any_filter,
    )


def test_samples_follow_the_distribution():
    probs = torch.tensor([0.55, 0.25, 0.12, 0.05, 0.03, 0.0])
    state = SamplingState(1, len(probs), torch.device("cpu"))
    state.admit(0, SamplingParams(temperature=1.0), seed=123, prompt_ids=[0])
    counts = torch.zeros(len(probs))
    draws = 6000
    for position in range(draws):
        counts[state.sample(probs.log()[None].clone(), _batch([0], [position]))] += 1
    freq = counts / draws
    assert counts[-1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq, probs, atol=0.02), freq


def test_top_k_and_top_p_limit_the_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0]] * 2)
    state = SamplingState(2, 5, torch.device("cpu"))
    state.admit(0, SamplingParams(temperature=1.0, top_k=2), seed=1, prompt_ids=[0])
    state.admit(1, SamplingParams(temperature=1.0, top_p=0.5), seed=2, prompt_ids=[0])
    seen = [set(), set()]
    for position in range(300):
        out = state.sample(logits.clone(), _batch([0, 1], [position, position], any_filter=True))
        seen[0].add(int(out[0]))
        seen[1].add(int(out[1]))
    assert seen[0] == {0, 1}
    assert seen[1] == {0}  # token 0 alone holds more than half the mass


def test_a_rows_draw_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    state = SamplingState(4, 1000, torch.device("cpu"))
    for row in range(4):
        state.admit(row, SamplingParams(temperature=0.9), seed=100 + row, prompt_ids=[0])
    together = state.sample(logits.clone(), _batch([0, 1, 2, 3], [7, 8, 9, 10]))
    for row in range(4):
        alone = state.sample(logits[row : row + 1].clone(), _batch([row], [7 + row]))
        assert int(alone[0]) == int(together[row])


def test_a_row_admitted_again_samples_with_its_new_parameters():
    """Admission writes a row on the host, and the next sampling reads it on the device: a row reused by
    another request must never sample with its previous owner's parameters."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0]])
    state = SamplingState(1, 5, torch.device("cpu"))
    state.admit(0, SamplingParams(temperature=1.0, top_k=1), seed=1, prompt_ids=[0])
    first = {int(state.sample(logits.clone(), _batch([0], [p], any_filter=True))[0]) for p in range(50)}
    assert first == {0}
    state.admit(0, SamplingParams(temperature=5.0, top_k=3), seed=2, prompt_ids=[0])
    second = {int(state.sample(logits.clone(), _batch([0], [p], any_filter=True))[0]) for p in range(200)}
    assert second == {0, 1, 2}
    assert float(state.temperature[0]) == 5.0 and int(state.top_k[0]) == 3 and int(state.seed[0]) == 2
