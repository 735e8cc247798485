"""Overlap scheduling (step N+1 queued before step N's outputs are read) changes nothing a caller sees:
the same tokens, texts, finish reasons, logprobs and hidden states as reading every step before the
next, on the real default model (which stops at EOS and stop strings, the cases where a step runs one
token past a request's end), under memory pressure, chunked prefill and sampling."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_pool_free

from engine import Engine

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "List three colors: red,",
    "In 1969, the first person to walk on the moon was",
    "Translate to French: good morning",
    "Q: What is 12 times 12?\nA:",
    "Once upon a time, in a land far away,",
    "Water boils at",
    "1, 2, 3, 4,",
]
PARAMS = [
    {"temperature": 0, "max_new_tokens": 40},  # stops at EOS
    {"temperature": 0, "max_new_tokens": 40, "stop": ["\n"]},
    {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 24},
    {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "min_new_tokens": 24},
    {"temperature": 0, "max_new_tokens": 0},
    {"temperature": 0, "max_new_tokens": 30, "frequency_penalty": 0.5, "stop_token_ids": [13]},
    {"temperature": 1.0, "top_k": 20, "seed": 3, "max_new_tokens": 32, "n": 2},
    {"temperature": 0, "max_new_tokens": 1},
    {"temperature": 0, "max_new_tokens": 40},
    {"temperature": 0, "max_new_tokens": 16, "stop": ["5"]},
]
# Under pressure, long requests whose length admission can only guess (a stop id they never reach)
# outgrow their reservation, so some are retracted; the early-stopping ones above alone never are.
LONG = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True, "stop_token_ids": [49151]}
SETTINGS = [
    {},
    {"max_total_tokens": 128, "chunked_prefill_size": 8},  # retractions and many-chunk prompts
]


def run(model_path, settings: dict, overlap: bool) -> tuple[list, list, dict]:
    prompts, params = PROMPTS, PARAMS
    if "max_total_tokens" in settings:
        prompts, params = PROMPTS + PROMPTS[:8], PARAMS + [LONG] * 8
    with Engine(model_path, disable_overlap_schedule=not overlap, **settings) as engine:
        outputs = engine.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
        hidden = engine.generate(PROMPTS[:3], PARAMS[:3], return_hidden_states=True)
        info = assert_pool_free(engine)
    return outputs, hidden, info


def comparable(output: dict) -> dict:
    """Everything but timings and logprob values (those differ by float rounding, as the batches of
    the two runs differ: compared within 1e-4 apart)."""
    meta = {k: v for k, v in output["meta_info"].items() if k not in ("e2e_latency", "id")}
    meta["output_token_logprobs"] = [t for _, t, _ in meta["output_token_logprobs"]]
    meta["output_top_logprobs"] = [[t for _, t, _ in top] for top in meta["output_top_logprobs"]]
    return {"text": output["text"], "output_ids": output["output_ids"], "meta": meta}


def logprob_values(output: dict) -> list[float]:
    meta = output["meta_info"]
    return [v for v, _, _ in meta["output_token_logprobs"]] + [
        v for top in meta["output_top_logprobs"] for v, _, _ in top
    ]


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "pressure-chunked"])
def test_overlap_changes_no_output(default_model_path, settings):
    plain, plain_hidden, plain_info = run(default_model_path, settings, overlap=False)
    over, over_hidden, over_info = run(default_model_path, settings, overlap=True)
    assert over_info["overlap_schedule"] and not plain_info["overlap_schedule"]
    assert [comparable(o) for o in over] == [comparable(o) for o in plain]
    for a, b in zip(over, plain):
        np.testing.assert_allclose(logprob_values(a), logprob_values(b), atol=1e-4)
    reasons = {o["meta_info"]["finish_reason"]["type"] for o in plain}
    assert reasons == {"stop", "length"}  # both kinds of end are exercised
    assert any(
        o["meta_info"]["finish_reason"]["type"] == "stop" and o["meta_info"]["completion_tokens"] < 40 for o in plain
    )  # a request ended early, while the next step was already queued
    for a, b in zip(over_hidden, plain_hidden):
        assert a["output_ids"] == b["output_ids"]
        assert len(a["meta_info"]["hidden_states"]) == len(b["meta_info"]["hidden_states"])
        for x, y in zip(a["meta_info"]["hidden_states"], b["meta_info"]["hidden_states"]):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4)  # batch-dependent rounding
    if "max_total_tokens" in settings:
        assert over_info["num_retractions"] > 0 and plain_info["num_retractions"] > 0
