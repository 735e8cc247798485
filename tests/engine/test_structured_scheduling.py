"""Structured output under everything the scheduler does: the same constrained (and free) outputs with
overlap scheduling on and off, through retractions in a tiny KV pool with many-chunk prefills, and at
tp_size=2 (CPU, gloo) as at tp_size=1. The grammar state advances with tokens read one step late under
overlap, and survives a request's retraction and re-admission."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from reference import assert_pool_free, tiny_model_dir

from engine import Engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "tags"],
}
# Exact lengths near max_new_tokens: admission expects less, so the tiny pool runs short and retracts.
LONG = [r"[0-9]{56}", r"[1-9]{55}(0|5)", r"[0-4]{53}-[5-9]{2}"]
CASES = [  # (prompt, sampling params, what the output must satisfy: a regex or the schema)
    ("Describe a user as JSON:", {"temperature": 0, "json_schema": json.dumps(SCHEMA)}, SCHEMA),
    ("A user profile in JSON:", {"temperature": 0.9, "seed": 3, "json_schema": json.dumps(SCHEMA)}, SCHEMA),
    ("The year is", {"temperature": 0, "regex": r"(19|20)[0-9]{2}"}, r"(19|20)[0-9]{2}"),
    ("Answer yes or no:", {"temperature": 0.8, "seed": 1, "ebnf": 'root ::= " yes" | " no"', "n": 2}, " (yes|no)"),
    ("The capital of France is", {"temperature": 0}, None),
    ("Once upon a time,", {"temperature": 0.9, "seed": 7}, None),
] + [
    (f"Write {i} digits:", {"temperature": 0.7, "seed": i, "regex": LONG[i % 3], "max_new_tokens": 60}, LONG[i % 3])
    for i in range(8)
]
PRESSURE = {"max_total_tokens": 160, "chunked_prefill_size": 8}


def run(model_path, **settings) -> tuple[list[dict], dict]:
    with Engine(model_path, **settings) as engine:
        outputs = engine.generate([p for p, _, _ in CASES], [{"max_new_tokens": 44} | params for _, params, _ in CASES])
        info = assert_pool_free(engine)
    return outputs, info


def comparable(outputs: list[dict]) -> list[tuple]:
    return [(o["text"], o["output_ids"], o["meta_info"]["finish_reason"]) for o in outputs]


def flat_cases() -> list[tuple]:
    """CASES with each n > 1 case repeated n times, as the outputs come."""
    return [case for case in CASES for _ in range(case[1].get("n", 1))]


def check_constraints(outputs: list[dict]) -> None:
    for (_, _, want), output in zip(flat_cases(), outputs):
        if want is None:
            continue
        assert output["meta_info"]["finish_reason"]["type"] == "stop", output
        if isinstance(want, dict):
            jsonschema.validate(json.loads(output["text"]), want)
        else:
            assert re.fullmatch(want, output["text"]), (want, output["text"])


def greedy(outputs: list[dict]) -> list[tuple]:
    return [o for (_, params, _), o in zip(flat_cases(), comparable(outputs)) if params["temperature"] == 0]


@pytest.fixture(scope="module")
def roomy(default_model_path) -> list[dict]:
    """Overlap on, a roomy pool: the default engine."""
    outputs, info = run(default_model_path)
    assert info["overlap_schedule"] and info["num_retractions"] == 0
    check_constraints(outputs)
    return outputs


@pytest.fixture(scope="module")
def pressed(default_model_path) -> list[dict]:
    """Overlap on, a tiny pool and 8-token prefill chunks: long constrained requests are retracted."""
    outputs, info = run(default_model_path, **PRESSURE)
    assert info["num_retractions"] > 0
    check_constraints(outputs)
    return outputs


def test_overlap_off_gives_the_same_constrained_outputs(default_model_path, roomy):
    outputs, _ = run(default_model_path, disable_overlap_schedule=True)
    assert comparable(outputs) == comparable(roomy)


def test_retraction_and_chunked_prefill_keep_the_constraints(roomy, pressed):
    # Sampled rows may differ from the roomy run's (chunked prefill rounds differently); greedy ones do not.
    # (Retraction with overlap on and off, token for token: tests/scheduler_proc/test_grammar.py.)
    assert greedy(pressed) == greedy(roomy)


def test_tensor_parallel_constrained_outputs_match_one_rank(tmp_path, default_model_path):
    model = tiny_model_dir(tmp_path, "llama", default_model_path)  # random weights: the grammar alone decides
    prompts = ["a", "b", "c"]
    params = [
        {"temperature": 0, "max_new_tokens": 40, "regex": r"[a-z]{3,8}-[0-9]{2}"},
        {"temperature": 1.0, "seed": 2, "max_new_tokens": 60, "json_schema": json.dumps(SCHEMA)},
        {"temperature": 0, "max_new_tokens": 12},
    ]
    results = []
    for tp_size in (1, 2):
        with Engine(model, tp_size=tp_size, max_total_tokens=4096, max_running_requests=8) as engine:
            results.append(comparable(engine.generate(prompts, params)))
    assert results[0] == results[1]
    one = results[0]
    assert re.fullmatch(r"[a-z]{3,8}-[0-9]{2}", one[0][0]) and one[0][2]["type"] == "stop"
    if one[1][2]["type"] == "stop":  # a random model may run out of tokens inside a string
        jsonschema.validate(json.loads(one[1][0]), SCHEMA)
