"""The radix prefix cache end to end on the default model: requests sharing a prefix reuse its KV
(meta_info.cached_tokens), outputs are the same as without the cache, a chat's next turn reuses the
last one, the n samples of a prompt prefill it once, flush_cache only empties an idle engine, and
no KV slot ever leaks (free + cached == pool after every test)."""

from __future__ import annotations

import pytest
import torch
from reference import assert_pool_free

from engine import Engine

SYSTEM = (
    "You are a careful assistant for a small bakery in Lyon. You answer questions about opening hours, "
    "bread, pastries and cakes in one short sentence, politely, and you never invent prices. "
)
QUESTIONS = [
    "Q: When do you open?\nA:",
    "Q: Do you sell croissants?\nA:",
    "Q: Is there a cake today?\nA:",
    "Q: Can I order bread for Sunday?\nA:",
]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def cached():
    with Engine(max_total_tokens=8192) as e:
        yield e


@pytest.fixture(scope="module")
def uncached():
    with Engine(max_total_tokens=8192, disable_radix_cache=True) as e:
        yield e


@pytest.fixture(autouse=True)
def no_leaked_slots(cached, uncached):
    yield
    assert_pool_free(cached)
    info = assert_pool_free(uncached)
    assert info["kv_cached_tokens"] == 0  # without the cache, every slot goes back to the pool


def test_shared_prefix_is_reused_and_outputs_match(cached, uncached, tokenizer):
    prefix_len = len(tokenizer(SYSTEM)["input_ids"])
    first = cached.generate(SYSTEM + QUESTIONS[0], GREEDY)
    assert first["meta_info"]["cached_tokens"] < prefix_len  # nothing of this prompt was cached yet
    rest = cached.generate([SYSTEM + q for q in QUESTIONS[1:]], GREEDY)
    for out in rest:
        # The system prompt's tokens (all but maybe the last, whose merge may differ) come from the cache.
        assert out["meta_info"]["cached_tokens"] >= prefix_len - 1
    expected = uncached.generate([SYSTEM + q for q in QUESTIONS], GREEDY)
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in expected)
    assert [o["output_ids"] for o in [first] + rest] == [o["output_ids"] for o in expected]


def test_repeated_prompt_computes_only_its_last_token(cached, uncached, tokenizer):
    prompt = "Repeat after me: the rain in Spain stays mainly in the plain."
    length = len(tokenizer(prompt)["input_ids"])
    once = cached.generate(prompt, GREEDY)
    again = cached.generate(prompt, GREEDY)
    assert again["meta_info"]["cached_tokens"] == length - 1  # the last token runs to give logits
    assert again["output_ids"] == once["output_ids"] == uncached.generate(prompt, GREEDY)["output_ids"]


def test_multi_turn_chat_reuses_the_previous_turn(cached, uncached, tokenizer):
    params = {"temperature": 0, "max_new_tokens": 24}
    conversation = [{"role": "user", "content": "Name a large city in France."}]
    reply = cached.chat(conversation, params)
    turn1_text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    turn1_len = len(tokenizer(turn1_text)["input_ids"])
    conversation += [
        {"role": "assistant", "content": reply["text"]},
        {"role": "user", "content": "What river flows through it?"},
    ]
    second = cached.chat(conversation, params)
    # The whole first prompt and (nearly) all of the reply were in the cache.
    assert second["meta_info"]["cached_tokens"] >= turn1_len + len(reply["output_ids"]) - 2
    assert second["output_ids"] == uncached.chat(conversation, params)["output_ids"]


def test_n_samples_prefill_their_prompt_once(cached, uncached, tokenizer):
    prompt = "Four different endings for this story about a lighthouse keeper and a storm:"
    length = len(tokenizer(prompt)["input_ids"])
    params = {"temperature": 0.8, "max_new_tokens": 8, "n": 4, "seed": 7}
    outs = cached.generate(prompt, params)
    # One sample computes the prompt; the other three find it in the cache, all but its last token.
    assert sorted(o["meta_info"]["cached_tokens"] for o in outs) == [0, length - 1, length - 1, length - 1]
    plain = uncached.generate(prompt, params)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in plain]  # seeded: same samples


def test_input_logprobs_and_hidden_states_are_complete_for_a_cached_prompt(cached, uncached, tokenizer):
    prompt = "Logprobs must cover every prompt token, cached or not."
    length = len(tokenizer(prompt)["input_ids"])
    cached.generate(prompt, GREEDY)  # now the prompt is in the cache
    params = {"temperature": 0, "max_new_tokens": 2}
    out = cached.generate(prompt, params, return_logprob=True, logprob_start_len=0)
    ref = uncached.generate(prompt, params, return_logprob=True, logprob_start_len=0)
    got, want = out["meta_info"]["input_token_logprobs"], ref["meta_info"]["input_token_logprobs"]
    assert out["meta_info"]["cached_tokens"] == 0  # every position is scored, so none is taken from the cache
    assert len(got) == length and [t for _, t, _ in got] == [t for _, t, _ in want]
    assert [lp for lp, _, _ in got[1:]] == pytest.approx([lp for lp, _, _ in want[1:]], abs=1e-4)
    tail = cached.generate(prompt, params, return_logprob=True, logprob_start_len=length - 3)
    assert tail["meta_info"]["cached_tokens"] == length - 4  # the position scoring token L-3 is computed
    assert len(tail["meta_info"]["input_token_logprobs"]) == 3
    hidden = cached.generate(prompt, params, return_hidden_states=True)
    assert hidden["meta_info"]["cached_tokens"] == 0
    assert hidden["meta_info"]["hidden_states"][0].shape[0] == length
    ref_hidden = uncached.generate(prompt, params, return_hidden_states=True)["meta_info"]["hidden_states"][0]
    assert torch.allclose(hidden["meta_info"]["hidden_states"][0], ref_hidden, atol=1e-4)


def test_flush_cache_when_idle_and_refused_when_busy(cached, tokenizer):
    prompt = "Flush me: a prompt that is cached, then forgotten."
    cached.generate(prompt, GREEDY)
    assert cached.get_server_info()["kv_cached_tokens"] > 0
    result = cached.flush_cache()
    assert result["ok"] is True and result["message"]
    info = cached.get_server_info()
    assert info["kv_cached_tokens"] == 0 and info["kv_free_tokens"] == info["kv_pool_tokens"]
    assert cached.generate(prompt, GREEDY)["meta_info"]["cached_tokens"] == 0  # computed afresh

    stream = cached.generate(prompt, {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}, stream=True)
    next(stream)  # the request is running now
    busy = cached.flush_cache()
    assert busy["ok"] is False and "running" in busy["message"]
    stream.close()  # aborts the request
    assert_pool_free(cached)
    assert cached.generate(prompt, GREEDY)["meta_info"]["cached_tokens"] == len(tokenizer(prompt)["input_ids"]) - 1
