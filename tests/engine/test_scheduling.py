"""Scheduling end to end on a tiny random model: memory pressure (retraction), chunked prefill,
decoding that keeps flowing while a long prompt prefills, aborts at every stage, both policies.

The judge is an engine with a large pool, unchunked prefill and no cache: greedy outputs must be the
same token for token, and no KV slot may leak (free + cached == pool) after any test."""

from __future__ import annotations

import threading
import time

import pytest
from reference import assert_pool_free, tiny_model_dir

from engine import Engine

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "List three colors: red,",
    "In 1969, the first person to walk on the moon was",
    "Translate to French: good morning",
    "The quick brown fox",
    "Q: What is 12 times 12?\nA:",
    "Once upon a time, in a land far away,",
    "The best way to learn a language is",
    "import numpy as np\n",
    "My favourite food is",
    "Water boils at",
    "The largest planet in the solar system is",
    "Dear Sir or Madam,",
    "1, 2, 3, 4,",
]
# A stop id (one these outputs never reach) makes each request's length a guess for admission, as
# with real traffic: requests that can only end by length reserve all of it and are never retracted.
GREEDY = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True, "stop_token_ids": [49151]}
SMALL_POOL = 192  # KV slots: the workload below needs more than 4x this
CHUNK = 32  # chunked_prefill_size of the chunked engine
LONG_LEN = 20 * CHUNK  # a prompt of 20 chunks


def long_prompt(seed: int) -> list[int]:
    """A distinct long prompt of token ids (distinct so that no cache hit shortens its prefill)."""
    return [100 + (seed * 7919 + i * 104729) % 40000 for i in range(LONG_LEN)]


SHORT = [100 + 17 * i for i in range(5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama", default_model_path)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy outputs of the judge engine for every input the tests use, by key."""
    with Engine(model_dir, max_total_tokens=8192, chunked_prefill_size=-1, disable_radix_cache=True) as e:
        workload = e.generate(PROMPTS, GREEDY)
        mixed = e.generate(input_ids=[long_prompt(0), SHORT], sampling_params=GREEDY)
    return {"workload": [o["output_ids"] for o in workload], "mixed": [o["output_ids"] for o in mixed]}


@pytest.mark.parametrize(
    "settings",
    [
        {"schedule_policy": "lpm"},
        {"schedule_policy": "fcfs"},
        {"disable_radix_cache": True},
        {"schedule_policy": "fcfs", "chunked_prefill_size": 16},
    ],
    ids=["lpm", "fcfs", "no-cache", "fcfs-chunked"],
)
def test_workload_needing_4x_the_pool_completes_with_identical_outputs(model_dir, reference, tokenizer, settings):
    needed = sum(len(ids) + GREEDY["max_new_tokens"] for ids in tokenizer(PROMPTS)["input_ids"])
    assert needed > 4 * SMALL_POOL
    with Engine(model_dir, max_total_tokens=SMALL_POOL, **settings) as engine:
        outputs = engine.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in outputs] == reference["workload"]
        assert all(o["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"] for o in outputs)
        info = assert_pool_free(engine)
        assert info["num_retractions"] > 0  # requests were sent back and resumed where they were


@pytest.fixture(scope="module", params=["cache", "no-cache"])
def chunked(model_dir, request):
    """Prefill in chunks of CHUNK tokens; two request rows, so a third request waits."""
    with Engine(
        model_dir,
        max_total_tokens=4096,
        chunked_prefill_size=CHUNK,
        max_running_requests=2,
        disable_radix_cache=request.param == "no-cache",
    ) as e:
        yield e


@pytest.fixture(autouse=True)
def no_leaked_slots(request):
    yield
    if "chunked" in request.fixturenames:
        assert_pool_free(request.getfixturevalue("chunked"))


def test_chunked_prefill_matches_unchunked(chunked, reference):
    outputs = chunked.generate(input_ids=[long_prompt(0), SHORT], sampling_params=GREEDY)
    assert [o["output_ids"] for o in outputs] == reference["mixed"]


def test_running_stream_keeps_receiving_tokens_while_a_long_prompt_prefills(chunked):
    params = [
        {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True},
    ]
    running_tokens_before_long_output = None
    running_tokens = 0
    for chunk in chunked.generate(input_ids=[SHORT, long_prompt(1)], sampling_params=params, stream=True):
        if chunk["index"] == 0:
            running_tokens += len(chunk["output_ids"])
        elif chunk["output_ids"] and running_tokens_before_long_output is None:
            running_tokens_before_long_output = running_tokens
    # The long prompt takes 20 steps of CHUNK tokens; the short request decodes a token in each of them.
    assert running_tokens_before_long_output is not None
    assert running_tokens_before_long_output >= 15


def test_abort_while_decoding(chunked):
    stream = chunked.generate(input_ids=SHORT, sampling_params={"max_new_tokens": 500, "ignore_eos": True}, stream=True)
    chunks = [next(stream), next(stream)]
    assert chunks[-1]["meta_info"]["finish_reason"] is None
    stream.close()  # aborts the request mid-decode


def test_abort_during_chunked_prefill(chunked):
    params = [
        {"temperature": 0, "max_new_tokens": 500, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
    ]
    stream = chunked.generate(
        input_ids=[SHORT, long_prompt(2)], sampling_params=params, rid=["runner", "long"], stream=True
    )
    runner_tokens, long_chunks = 0, []
    for chunk in stream:
        if chunk["index"] == 0:
            runner_tokens += len(chunk["output_ids"])
            if runner_tokens >= 3 and not long_chunks:
                chunked.abort("long")  # 3 of its 20 prefill steps done
        else:
            long_chunks.append(chunk)
            break
    stream.close()
    assert long_chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert sum(len(c["output_ids"]) for c in long_chunks) == 0  # aborted before its first token


def test_abort_while_waiting(chunked):
    params = {"max_new_tokens": 500, "ignore_eos": True}
    stream = chunked.generate(input_ids=[SHORT, SHORT[::-1]], sampling_params=params, stream=True)
    seen = set()
    while len(seen) < 2:  # both request rows are taken
        seen.add(next(stream)["index"])
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(chunked.generate(input_ids=SHORT[1:], rid="waiter")))
    waiter.start()
    while chunked.get_server_info()["num_waiting"] == 0:  # until the scheduler has queued it
        time.sleep(0.01)
    chunked.abort("waiter")
    waiter.join()
    stream.close()
    assert result[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result[0]["output_ids"] == []
