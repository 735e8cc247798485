"""parse_sampling_params alone: what a user coming from vLLM or OpenAI gets for their names and typos."""

from __future__ import annotations

import pytest

from engine.shared.sampling import SamplingParams, parse_sampling_params


@pytest.mark.parametrize(
    "raw, hint",
    [
        ({"temprature": 0.5}, "unknown key 'temprature' (did you mean 'temperature'?)"),
        ({"max_tokens": 8}, "unknown key 'max_tokens' (did you mean 'max_new_tokens'?)"),
        ({"max_completion_tokens": 8}, "(did you mean 'max_new_tokens'?)"),
        ({"min_tokens": 2}, "(did you mean 'min_new_tokens'?)"),
        ({"topp": 0.9}, "(did you mean 'top_p'?)"),
    ],
)
def test_unknown_keys_get_a_suggestion(raw, hint):
    with pytest.raises(ValueError) as info:
        parse_sampling_params(raw, vocab_size=100)
    assert hint in str(info.value)
    assert "valid keys are" in str(info.value)


def test_no_suggestion_for_a_key_like_nothing():
    with pytest.raises(ValueError) as info:
        parse_sampling_params({"zzzz": 1}, vocab_size=100)
    assert "unknown key 'zzzz';" in str(info.value)


def test_a_sampling_params_object_is_taken_like_its_dict():
    params = parse_sampling_params(SamplingParams(temperature=0.0, max_new_tokens=7), vocab_size=100)
    assert params.temperature == 0.0 and params.max_new_tokens == 7
