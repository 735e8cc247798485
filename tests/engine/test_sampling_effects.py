"""Each sampling parameter changes real outputs of the default model the way it promises.

Requests that need not run alone share one batched call (a CPU forward step costs about the same
for one row or six), which also shows that each row keeps its own parameters.
"""

from __future__ import annotations

import pytest
from reference import assert_pool_free, hf_greedy

from engine import Engine

COUNTING = "1, 2, 3, 4,"  # greedy: " 5, 6, 7, 8, ..." one digit, comma or space per token
STORY = "Once upon a time, in a land far away,"
REPEATS = "apple banana apple banana apple banana apple banana apple banana apple banana"
HI = [{"role": "user", "content": "Say hi."}]  # the chat reply ends with <|im_end|> after ~24 tokens
EOS = 2  # <|im_end|>, the default model's end-of-sequence token
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
SAMPLED = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True}
STOP = "6, 7"  # four tokens of COUNTING's greedy output: "6", ",", " ", "7"


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


@pytest.fixture(scope="module")
def greedy_story(engine, hf_default_model, tokenizer) -> list[int]:
    ids = engine.generate(STORY, GREEDY)["output_ids"]
    assert ids == hf_greedy(hf_default_model, tokenizer(STORY)["input_ids"], 12)
    return ids


@pytest.fixture(scope="module")
def greedy_chat(engine) -> dict:
    out = engine.chat(HI, {"temperature": 0})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    return out


def _repeats(prompt_ids: list[int], output_ids: list[int]) -> int:
    """Output tokens that already occurred in the prompt or earlier in the output."""
    seen, count = set(prompt_ids), 0
    for token in output_ids:
        count += token in seen
        seen.add(token)
    return count


# ---- filtering: each degenerate setting equals greedy ----

FILTERS = {
    "temperature-0": GREEDY,
    "top_k-1": dict(SAMPLED, top_k=1, seed=1),
    "top_p-tiny": dict(SAMPLED, top_p=1e-6, seed=2),
    "min_p-near-1": dict(SAMPLED, min_p=0.999, seed=3),
}


@pytest.fixture(scope="module")
def filtered(engine) -> dict[str, list[int]]:
    # Freely sampled rows in the same batch keep the sampler off its all-greedy shortcut.
    names = list(FILTERS)
    params = [FILTERS[n] for n in names] + [dict(SAMPLED, seed=s) for s in (1, 2, 3)]
    outputs = engine.generate([STORY] * len(params), params)
    result = {name: out["output_ids"] for name, out in zip(names, outputs)}
    result["free"] = [out["output_ids"] for out in outputs[len(names) :]]
    return result


@pytest.mark.parametrize("name", list(FILTERS))
def test_degenerate_filter_is_greedy(filtered, greedy_story, name):
    assert filtered[name] == greedy_story


def test_temperature_one_samples_off_the_greedy_path(filtered, greedy_story):
    # The tests above prove something only because plain sampling leaves the greedy path.
    assert all(ids != greedy_story for ids in filtered["free"])


def test_top_k_limits_choices_to_the_k_most_likely(engine, hf_default_model, tokenizer):
    import torch

    ids = tokenizer(STORY)["input_ids"]
    with torch.inference_mode():
        top2 = set(hf_default_model(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist())
    params = [{"temperature": 5.0, "top_k": 2, "max_new_tokens": 1, "seed": s} for s in range(12)]
    firsts = {out["output_ids"][0] for out in engine.generate([STORY] * 12, params)}
    assert firsts == top2  # a flat distribution, yet only the two most likely tokens, and both of them


# ---- lengths and EOS ----


def test_max_new_tokens_is_respected(engine):
    outputs = engine.generate([STORY, STORY], [dict(SAMPLED, max_new_tokens=5, seed=0), {"max_new_tokens": 0}])
    assert len(outputs[0]["output_ids"]) == outputs[0]["meta_info"]["completion_tokens"] == 5
    assert outputs[0]["meta_info"]["finish_reason"] == {"type": "length", "matched": None}
    assert outputs[1]["output_ids"] == [] and outputs[1]["text"] == ""
    assert outputs[1]["meta_info"]["finish_reason"]["type"] == "length"


def test_min_new_tokens_holds_back_eos(engine, greedy_chat):
    natural = greedy_chat["meta_info"]["completion_tokens"]
    held = engine.chat(HI, {"temperature": 0, "min_new_tokens": natural + 2, "max_new_tokens": natural + 8})
    assert held["meta_info"]["completion_tokens"] > natural + 2
    assert EOS not in held["output_ids"][: natural + 2]
    assert held["output_ids"][: natural - 1] == greedy_chat["output_ids"][: natural - 1]


def test_ignore_eos_generates_past_eos(engine, greedy_chat):
    natural = greedy_chat["meta_info"]["completion_tokens"]
    out = engine.chat(HI, {"temperature": 0, "ignore_eos": True, "max_new_tokens": natural + 3})
    assert out["meta_info"]["completion_tokens"] == natural + 3
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["output_ids"][natural - 1] == EOS  # the EOS was sampled, and generation went on


def test_skip_special_tokens_false_shows_eos(engine, greedy_chat):
    shown = engine.chat(HI, {"temperature": 0, "skip_special_tokens": False})
    assert "<|im_end|>" not in greedy_chat["text"]
    assert shown["text"] == greedy_chat["text"] + "<|im_end|>"
    assert shown["output_ids"] == greedy_chat["output_ids"]


# ---- penalties and bias ----

PENALTIES = {"repetition_penalty": 1.8, "frequency_penalty": 2.0, "presence_penalty": 2.0}


@pytest.fixture(scope="module")
def penalised(engine) -> dict[str, list[int]]:
    names = list(PENALTIES)
    params = [dict(GREEDY, **{name: PENALTIES[name]}) for name in names] + [GREEDY]
    outputs = engine.generate([STORY] * len(params), params)
    return {name: out["output_ids"] for name, out in zip(names + ["none"], outputs)}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_penalty_lowers_repeats(penalised, greedy_story, tokenizer, name):
    prompt_ids = tokenizer(STORY)["input_ids"]
    assert _repeats(prompt_ids, greedy_story) >= 3  # " Eridus" and friends come back
    assert penalised[name] != greedy_story
    assert _repeats(prompt_ids, penalised[name]) < _repeats(prompt_ids, greedy_story) - 1


def test_penalties_stay_on_their_own_rows(penalised, greedy_story):
    assert penalised["none"] == greedy_story


def test_negative_frequency_penalty_encourages_repeats(engine, tokenizer):
    prompt_ids = tokenizer(REPEATS)["input_ids"]
    base, eager = engine.generate([REPEATS, REPEATS], [GREEDY, dict(GREEDY, frequency_penalty=-2.0)])
    assert _repeats(prompt_ids, eager["output_ids"]) > _repeats(prompt_ids, base["output_ids"]) + 3


def test_logit_bias_forces_a_token(engine, tokenizer, greedy_story):
    banana = tokenizer(" banana")["input_ids"]
    assert len(banana) == 1
    bias = {str(banana[0]): 100.0}  # JSON-style string keys are accepted too
    ban = {greedy_story[0]: float("-inf")}
    params = [
        dict(GREEDY, max_new_tokens=6, logit_bias=bias),
        dict(SAMPLED, max_new_tokens=6, seed=0, logit_bias=bias),
        dict(SAMPLED, max_new_tokens=6, seed=1),
        dict(GREEDY, max_new_tokens=3, logit_bias=ban),
    ]
    outputs = engine.generate([STORY] * 4, params)
    for out in outputs[:2]:
        assert out["output_ids"] == banana * 6
        assert out["text"] == " banana" * 6
    assert banana[0] not in outputs[2]["output_ids"]  # the bias is its request's alone
    assert outputs[3]["output_ids"][0] != greedy_story[0]  # -inf bans the greedy choice


# ---- stopping ----


@pytest.fixture(scope="module")
def counting_free(engine, tokenizer) -> list[int]:
    ids = engine.generate(COUNTING, {"temperature": 0, "max_new_tokens": 10})["output_ids"]
    assert [tokenizer.decode([t]) for t in ids[:8]] == [" ", "5", ",", " ", "6", ",", " ", "7"]
    return ids


STOPS = {
    "trim": {"stop": [STOP, "never"]},
    "keep": {"stop": STOP, "no_stop_trim": True},
    "first-wins": {"stop": ["9,", "7,"]},
    "token": {"stop_token_ids": [28]},  # ","
}


@pytest.fixture(scope="module")
def stopped(engine) -> dict[str, dict]:
    names = list(STOPS)
    params = [dict(STOPS[n], temperature=0, max_new_tokens=20) for n in names]
    return dict(zip(names, engine.generate([COUNTING] * len(names), params)))


@pytest.fixture(scope="module")
def stopped_stream(engine) -> dict[str, list[str]]:
    names = list(STOPS)
    params = [dict(STOPS[n], temperature=0, max_new_tokens=20) for n in names]
    deltas: dict[str, list[str]] = {n: [] for n in names}
    for chunk in engine.generate([COUNTING] * len(names), params, stream=True):
        deltas[names[chunk["index"]]].append(chunk["text"])
    return deltas


def test_stop_string_split_across_tokens(stopped, stopped_stream, counting_free):
    out = stopped["trim"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": STOP}
    assert out["text"] == " 5, "
    assert out["output_ids"] == counting_free[:8]  # ended at the token completing the stop string
    assert "".join(stopped_stream["trim"]) == " 5, "  # nothing at or after the stop, even in pieces


def test_no_stop_trim_keeps_the_stop_string(stopped, stopped_stream):
    out = stopped["keep"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": STOP}
    assert out["text"] == " 5, 6, 7"
    assert "".join(stopped_stream["keep"]) == " 5, 6, 7"


def test_first_of_several_stop_strings_wins(stopped, stopped_stream):
    assert stopped["first-wins"]["meta_info"]["finish_reason"]["matched"] == "7,"
    assert stopped["first-wins"]["text"] == "".join(stopped_stream["first-wins"]) == " 5, 6, "


def test_stop_token_ids(stopped, counting_free):
    out = stopped["token"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 28}
    assert out["output_ids"] == counting_free[:3]  # " ", "5", ","


def test_spaces_between_special_tokens(engine, tokenizer):
    # Forced special tokens: this byte-level tokenizer puts no space between them, and False keeps it
    # so (the option's effect on a tokenizer that spaces them is unit-tested in tests/detokenizer_proc).
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    params = {"temperature": 0, "max_new_tokens": 3, "skip_special_tokens": False, "logit_bias": {start: 100.0}}
    variants = [params, dict(params, spaces_between_special_tokens=False), dict(params, skip_special_tokens=True)]
    on, off, skipped = engine.generate([STORY] * 3, variants)
    assert on["text"] == off["text"] == "<|im_start|>" * 3
    assert skipped["text"] == ""


# ---- seeds and n ----


def test_seed_gives_the_same_tokens_alone_and_in_a_batch(engine):
    params = dict(SAMPLED, seed=1234)
    alone = engine.generate(STORY, params)["output_ids"]
    batch = engine.generate(
        [COUNTING, STORY, REPEATS, STORY, STORY, STORY],
        [dict(SAMPLED, seed=5), params, GREEDY, dict(SAMPLED, seed=1235), SAMPLED, SAMPLED],
    )
    assert batch[1]["output_ids"] == alone
    assert batch[3]["output_ids"] != alone  # another seed, another sample
    assert batch[4]["output_ids"] != batch[5]["output_ids"]  # unseeded requests draw their own seeds


def test_n_returns_n_different_samples(engine):
    outputs = engine.generate(STORY, dict(SAMPLED, n=4))
    assert isinstance(outputs, list) and len(outputs) == 4
    assert len({tuple(o["output_ids"]) for o in outputs}) == 4
    assert len({o["meta_info"]["id"] for o in outputs}) == 4


def test_n_with_a_seed_is_reproducible_sample_by_sample(engine):
    outputs = engine.generate([STORY, STORY], [dict(SAMPLED, n=3, seed=99), dict(SAMPLED, seed=99)])
    assert len(outputs) == 4
    assert len({tuple(o["output_ids"]) for o in outputs[:3]}) == 3
    assert outputs[0]["output_ids"] == outputs[3]["output_ids"]  # sample 0 uses the seed itself


def test_n_over_a_prompt_list_is_prompt_major(engine, tokenizer):
    prompts = [COUNTING, STORY]
    params = [dict(SAMPLED, n=4, max_new_tokens=3), dict(SAMPLED, n=4, max_new_tokens=5)]
    outputs = engine.generate(prompts, params)
    assert len(outputs) == 8
    assert [o["meta_info"]["completion_tokens"] for o in outputs] == [3] * 4 + [5] * 4
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert [o["meta_info"]["prompt_tokens"] for o in outputs] == [lengths[0]] * 4 + [lengths[1]] * 4
    assert_pool_free(engine)
