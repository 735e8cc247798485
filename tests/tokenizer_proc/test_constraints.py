"""The frontend's constraint check: a bad constraint is a ValueError naming its field, and one checked before is
answered at once (async_generate hops to a thread only for a constraint it has not seen)."""

from __future__ import annotations

import json

import pytest

from engine.shared.sampling import SamplingParams, parse_sampling_params
from tokenizer_proc.constraints import check_constraint, needs_checking


def test_a_constraint_checked_once_is_answered_without_a_thread():
    schema = json.dumps({"type": "object", "properties": {"checked_once": {"type": "integer"}}})
    assert needs_checking({"json_schema": schema})
    check_constraint(SamplingParams(json_schema=schema))
    assert not needs_checking({"json_schema": schema})
    assert not needs_checking([{"max_new_tokens": 4}, SamplingParams(json_schema=schema)])
    assert not needs_checking({"temperature": 0.5})
    assert not needs_checking({"json_schema": json.loads(schema)})  # a dict: the text SamplingParams makes
    assert needs_checking({"json_schema": {"type": "object", "title": "unseen"}})
    assert needs_checking({"json_schema": {"type": object()}})  # not JSON: the check reports it
    assert needs_checking([{}, {"regex": "[0-9]+ unseen"}])


def test_a_bad_constraint_fails_again_from_the_cache():
    params = SamplingParams(regex="(unclosed")
    for _ in range(2):
        with pytest.raises(ValueError, match="sampling_params.regex is not a valid regex"):
            check_constraint(params)
        assert not needs_checking({"regex": "(unclosed"})


def test_a_dict_schema_that_is_not_json_is_an_error_naming_the_field():
    with pytest.raises(TypeError, match="sampling_params.json_schema must be JSON"):
        parse_sampling_params({"json_schema": {"type": object()}}, 1000)
