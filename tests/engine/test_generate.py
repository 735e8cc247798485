"""End to end on the default model: parity with HF, batch invariance, streaming, the seed's modes."""

from __future__ import annotations

import asyncio

import pytest
from reference import assert_pool_free, hf_greedy

from engine import Engine
from engine.utils import async_stream_and_merge, stream_and_merge

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
GREEDY32 = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


def test_greedy_matches_hf(engine, hf_default_model, tokenizer):
    outputs = engine.generate(PROMPTS[:4], GREEDY32)
    for prompt, out in zip(PROMPTS[:4], outputs):
        expected = hf_greedy(hf_default_model, tokenizer(prompt)["input_ids"], 32)
        assert out["output_ids"] == expected, prompt
        assert out["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert out["meta_info"]["completion_tokens"] == 32
        assert out["meta_info"]["finish_reason"] == {"type": "length", "matched": None}


def test_batch_invariance(engine):
    batched = engine.generate(PROMPTS, GREEDY32)
    for prompt, out in zip(PROMPTS, batched):
        alone = engine.generate(prompt, GREEDY32)
        assert alone["output_ids"] == out["output_ids"], prompt


def test_input_ids_in_equals_text_in(engine, tokenizer):
    by_text = engine.generate(PROMPTS[0], GREEDY32)
    by_ids = engine.generate(input_ids=tokenizer(PROMPTS[0])["input_ids"], sampling_params=GREEDY32)
    assert by_ids["output_ids"] == by_text["output_ids"]


def test_stream_deltas_concatenate_to_text(engine):
    params = {"temperature": 0, "max_new_tokens": 40}
    whole = engine.generate(PROMPTS[1], params)
    chunks = list(engine.generate(PROMPTS[1], params, stream=True))
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum((c["output_ids"] for c in chunks), []) == whole["output_ids"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]


@pytest.mark.parametrize("prompt", ["Emoji party: 🎉🎉", "中文：我喜欢", "日本語で答えてください：こんにちは"])
def test_stream_never_splits_a_character(engine, prompt):
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    whole = engine.generate(prompt, params)
    deltas = [c["text"] for c in engine.generate(prompt, params, stream=True)]
    assert "".join(deltas) == whole["text"]
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # a lone surrogate or broken sequence would raise


def test_multibyte_output_is_produced_and_intact(engine, tokenizer):
    # Feed ids of a CJK text so the model continues in CJK; every delta must stay whole characters.
    ids = tokenizer("中文：我喜欢中文。中文：我喜欢中文。中文：")["input_ids"]
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    deltas = [c["text"] for c in engine.generate(input_ids=ids, sampling_params=params, stream=True)]
    text = "".join(deltas)
    assert any(ord(ch) > 0x2E80 for ch in text)
    assert all("\ufffd" not in d for d in deltas)


def test_seed_four_modes(engine):
    prompts = PROMPTS[:3]
    params = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 12}
    outputs = engine.generate(prompts, params)
    assert len(outputs) == 3 and all(o["text"] for o in outputs)
    greedy = {"temperature": 0, "max_new_tokens": 12}
    merged = stream_and_merge(engine, prompts[0], greedy)
    assert merged == engine.generate(prompts[0], greedy)["text"]

    async def async_batch():
        return await engine.async_generate(prompts, params)

    assert len(asyncio.run(async_batch())) == 3

    async def async_stream():
        return "".join([piece async for piece in async_stream_and_merge(engine, prompts[0], greedy)])

    assert asyncio.run(async_stream()) == merged


def test_chat_answers_paris(engine):
    reply = engine.chat([{"role": "user", "content": "What is the capital of France?"}], {"temperature": 0})
    assert "Paris" in reply["text"]
    assert reply["meta_info"]["finish_reason"]["type"] == "stop"


def test_stop_string_is_trimmed_and_named(engine):
    free = engine.generate(PROMPTS[15], {"temperature": 0, "max_new_tokens": 20})["text"]
    assert " 6," in free  # the model counts on
    out = engine.generate(PROMPTS[15], {"temperature": 0, "max_new_tokens": 20, "stop": [" 6,"]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " 6,"}
    assert out["text"] == free[: free.index(" 6,")]
    chunks = [
        c["text"]
        for c in engine.generate(PROMPTS[15], {"temperature": 0, "max_new_tokens": 20, "stop": [" 6,"]}, stream=True)
    ]
    assert "".join(chunks) == out["text"]


def test_kv_pool_is_free_after_requests(engine):
    engine.generate(PROMPTS, {"temperature": 0.7, "max_new_tokens": 8})
    info = assert_pool_free(engine)  # free + prefix-cached slots == pool
    assert info["num_running"] == 0 and info["num_waiting"] == 0


def test_progress_bar_on_long_batch(engine, capsys):
    outputs = engine.generate(PROMPTS[:8], {"temperature": 0, "max_new_tokens": 2}, use_tqdm=True)
    assert len(outputs) == 8
    assert "8/8" in capsys.readouterr().err


def test_sampling_params_objects_work_like_dicts(engine):
    """vLLM users pass SamplingParams objects; one, or one per prompt, gives what the dicts give."""
    from engine import SamplingParams

    params = {"temperature": 0.8, "max_new_tokens": 8, "seed": 3, "ignore_eos": True}
    as_dicts = engine.generate(PROMPTS[:2], params)
    as_object = engine.generate(PROMPTS[:2], SamplingParams(**params))
    as_list = engine.generate(PROMPTS[:2], [SamplingParams(**params), SamplingParams(**params)])
    assert [o["output_ids"] for o in as_object] == [o["output_ids"] for o in as_dicts]
    assert [o["output_ids"] for o in as_list] == [o["output_ids"] for o in as_dicts]
    with pytest.raises(TypeError, match="sampling_params must be a dict or SamplingParams"):
        engine.generate(PROMPTS[0], sampling_params=3)


def test_a_batch_shows_progress_with_token_rates(engine, capfd):
    outputs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 8}, use_tqdm=True)
    err = capfd.readouterr().err
    assert len(outputs) == len(PROMPTS)
    assert f"{len(PROMPTS)}/{len(PROMPTS)}" in err and "output" in err and "tok/s" in err
