"""Logprobs and hidden states on the default model, judged by HF transformers on CPU in float32."""

from __future__ import annotations

import pytest
import torch
from reference import hf_logprobs

from engine import Engine

PROMPT = "The capital of France is Paris. The capital of Germany is"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
TOL = 1e-4


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROMPT)["input_ids"]


def _ref(hf_default_model, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    return hf_logprobs(hf_default_model, prompt_ids + output_ids)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL


def test_output_and_input_logprobs_match_hf(engine, hf_default_model, tokenizer, prompt_ids):
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=0)
    meta = out["meta_info"]
    ref = _ref(hf_default_model, prompt_ids, out["output_ids"])
    n = len(prompt_ids)

    output = meta["output_token_logprobs"]
    assert [t for _, t, _ in output] == out["output_ids"]
    for k, (logprob, token, text) in enumerate(output):
        assert _close(logprob, ref[n - 1 + k, token].item()), k
        assert text is None  # no return_text_in_logprobs

    inputs = meta["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids
    assert inputs[0][0] is None  # nothing scores the first token
    for q in range(1, n):
        assert _close(inputs[q][0], ref[q - 1, prompt_ids[q]].item()), q
    assert "input_top_logprobs" not in meta and "output_top_logprobs" not in meta


@pytest.mark.parametrize("start", [5, 11])
def test_logprob_start_len_in_the_middle(engine, hf_default_model, prompt_ids, start):
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=start)
    ref = _ref(hf_default_model, prompt_ids, out["output_ids"])
    inputs = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == prompt_ids[start:]
    for j, (logprob, token, _) in enumerate(inputs):
        assert _close(logprob, ref[start + j - 1, token].item()), j


def test_default_start_gives_no_input_logprobs(engine, prompt_ids):
    out = engine.generate(PROMPT, GREEDY, return_logprob=True)
    assert out["meta_info"]["input_token_logprobs"] == []
    assert len(out["meta_info"]["output_token_logprobs"]) == 8
    end = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=len(prompt_ids))
    assert end["meta_info"]["input_token_logprobs"] == []


def test_top_logprobs_are_sorted_and_lead_with_the_greedy_token(engine, hf_default_model, prompt_ids):
    k = 5
    out = engine.generate(PROMPT, GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=k)
    meta = out["meta_info"]
    ref = _ref(hf_default_model, prompt_ids, out["output_ids"])
    n = len(prompt_ids)
    tops = meta["output_top_logprobs"]
    assert len(tops) == len(out["output_ids"])
    for j, (top, chosen) in enumerate(zip(tops, meta["output_token_logprobs"])):
        values = [lp for lp, _, _ in top]
        assert len(top) == k and values == sorted(values, reverse=True)
        assert top[0][1] == chosen[1] and _close(top[0][0], chosen[0])
        expected = ref[n - 1 + j].topk(k)
        assert [t for _, t, _ in top] == expected.indices.tolist()
        assert all(_close(a, b) for a, b in zip(values, expected.values.tolist()))
    input_tops = meta["input_top_logprobs"]
    assert len(input_tops) == n and not input_tops[0]  # the first prompt token has no scores
    for q in range(1, n):
        assert [t for _, t, _ in input_tops[q]] == ref[q - 1].topk(k).indices.tolist()


def test_return_text_in_logprobs(engine, tokenizer):
    out = engine.generate(
        PROMPT, GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=2, return_text_in_logprobs=True
    )
    meta = out["meta_info"]
    for name in ("input_token_logprobs", "output_token_logprobs"):
        assert all(text == tokenizer.decode([t]) for _, t, text in meta[name]), name
    for top in meta["output_top_logprobs"]:
        assert all(text == tokenizer.decode([t]) for _, t, text in top)
    assert "".join(text for _, _, text in meta["output_token_logprobs"]) == out["text"]


def test_logprobs_are_before_temperature_and_penalties(engine, hf_default_model, prompt_ids):
    params = {
        "temperature": 0.5,
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.5,
        "max_new_tokens": 8,
        "seed": 11,
        "ignore_eos": True,
    }
    out = engine.generate(PROMPT, params, return_logprob=True)
    ref = _ref(hf_default_model, prompt_ids, out["output_ids"])
    n = len(prompt_ids)
    for k, (logprob, token, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        assert _close(logprob, ref[n - 1 + k, token].item()), k
    # Scaled by the temperature they would differ: the test can tell the two apart.
    scaled = torch.log_softmax(torch.log_softmax(ref[n - 1], -1) / 0.5, -1)[out["output_ids"][0]].item()
    assert not _close(scaled, out["meta_info"]["output_token_logprobs"][0][0])


def test_input_logprobs_across_prefill_chunks(engine, hf_default_model, tokenizer):
    # Longer than the CPU prefill chunk (512 tokens), so the scores come from two steps.
    prompt = " ".join(f"item {i} is {i * 7 % 13}," for i in range(120))
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 600
    start = 500
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 2}, return_logprob=True, logprob_start_len=start)
    ref = _ref(hf_default_model, ids, out["output_ids"])
    inputs = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inputs] == ids[start:]
    for j, (logprob, token, _) in enumerate(inputs):
        assert _close(logprob, ref[start + j - 1, token].item()), j


def test_streamed_logprobs_add_up(engine):
    kwargs = {"return_logprob": True, "logprob_start_len": 0}
    whole = engine.generate(PROMPT, GREEDY, **kwargs)["meta_info"]
    chunks = list(engine.generate(PROMPT, GREEDY, stream=True, **kwargs))
    for name in ("input_token_logprobs", "output_token_logprobs"):
        assert sum((c["meta_info"][name] for c in chunks), []) == whole[name]


# ---- hidden states ----


@torch.inference_mode()
def _hf_last_hidden(model, ids: list[int]) -> torch.Tensor:
    # In transformers 5 the last entry of hidden_states is the final-normed state (== last_hidden_state).
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0]


def _check_hidden(out: dict, prompt_ids: list[int], hf_model) -> None:
    states = out["meta_info"]["hidden_states"]
    hidden = hf_model.config.hidden_size
    n, completion = len(prompt_ids), out["meta_info"]["completion_tokens"]
    assert states[0].shape == (n, hidden)
    assert len(states) == completion  # the prompt's block, then one per decode step
    assert all(s.shape == (hidden,) for s in states[1:])
    ours = torch.cat([states[0]] + [s[None] for s in states[1:]])
    ref = _hf_last_hidden(hf_model, prompt_ids + out["output_ids"][:-1])
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


def test_hidden_states_per_request(engine, hf_default_model, prompt_ids):
    out = engine.generate(PROMPT, GREEDY, return_hidden_states=True)
    _check_hidden(out, prompt_ids, hf_default_model)
    assert "hidden_states" not in engine.generate(PROMPT, GREEDY)["meta_info"]


def test_hidden_states_in_a_mixed_batch(engine, hf_default_model, tokenizer):
    prompts = [PROMPT, "def fibonacci(n):"]
    outputs = engine.generate(prompts, GREEDY, return_hidden_states=True)
    for prompt, out in zip(prompts, outputs):
        _check_hidden(out, tokenizer(prompt)["input_ids"], hf_default_model)


def test_hidden_states_engine_wide(hf_default_model, prompt_ids):
    with Engine(return_hidden_states=True) as engine:
        out = engine.generate(PROMPT, GREEDY)
        _check_hidden(out, prompt_ids, hf_default_model)
        chunks = list(engine.generate(PROMPT, GREEDY, stream=True))
        streamed = sum((c["meta_info"]["hidden_states"] for c in chunks), [])
        assert len(streamed) == len(out["meta_info"]["hidden_states"])
        assert all(torch.equal(a, b) for a, b in zip(streamed, out["meta_info"]["hidden_states"]))
        assert "hidden_states" not in engine.generate(PROMPT, GREEDY, return_hidden_states=False)["meta_info"]
