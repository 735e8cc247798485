"""Incremental detokenization: never half a character, never text at or after a stop string, and
the decode options, with the default model's tokenizer fed one token at a time."""

from __future__ import annotations

import random

import pytest

from detokenizer_proc.detokenizer import Detokenizer
from detokenizer_proc.incremental import DecodeState
from engine.shared.protocol import DetokenizeSpec, FinishReason, TokenBatch
from engine.shared.text import TextDecoder


def spec(
    rid: str = "r", stop: tuple[str, ...] = (), no_stop_trim: bool = False, skip: bool = True, spaces: bool = True
) -> DetokenizeSpec:
    return DetokenizeSpec(
        rid=rid,
        skip_special_tokens=skip,
        spaces_between_special_tokens=spaces,
        stop=list(stop),
        no_stop_trim=no_stop_trim,
        return_text_in_logprobs=False,
    )


def feed(detokenizer: Detokenizer, ids: list[int], s: DetokenizeSpec, finish: FinishReason, per_step: int = 1):
    """Send ids a few at a time as the scheduler would; returns the text deltas, in order."""
    deltas = []
    for i in range(0, len(ids), per_step):
        last = i + per_step >= len(ids)
        batch = TokenBatch(
            rids=[s.rid],
            new_token_ids=[ids[i : i + per_step]],
            finish=[finish if last else None],
            prompt_tokens=[1],
            cached_tokens=[0],
            extras=[None],
            new_specs=[s] if i == 0 else [],
        )
        deltas += batch_text(detokenizer, batch)
    return deltas


def batch_text(detokenizer: Detokenizer, batch: TokenBatch) -> list[str]:
    return detokenizer.process(batch).text_deltas


@pytest.fixture(scope="module")
def detokenizer(tokenizer) -> Detokenizer:
    return Detokenizer(tokenizer)


LENGTH = FinishReason(type="length")


TEXTS = ["Emoji party: 🎉🎉 done", "中文：我喜欢中文。", "naïve café — “quotes”", "plain ascii text"]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_held_until_whole(detokenizer, tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    if text.startswith(("Emoji", "中文")):
        assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some token holds part of a character
    deltas = feed(detokenizer, ids, spec(), LENGTH)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert detokenizer.states == {}  # finished requests leave nothing behind


def test_dangling_partial_character_is_dropped_at_the_end(detokenizer, tokenizer):
    ids = tokenizer("ok 🎉")["input_ids"]
    deltas = feed(detokenizer, ids[:-1], spec(), LENGTH)  # the emoji's last byte never comes
    assert "".join(deltas) == "ok "


def test_stop_string_is_trimmed_and_never_streamed(detokenizer, tokenizer):
    text = " 5, 6, 7, 8, 9"
    ids = tokenizer(text)["input_ids"]
    stop = "6, 7"
    end = next(i for i in range(len(ids)) if stop in tokenizer.decode(ids[: i + 1]))  # where the scheduler stops
    deltas = feed(detokenizer, ids[: end + 1], spec(stop=(stop,)), FinishReason(type="stop", matched=stop))
    assert "".join(deltas) == " 5, "
    assert all("6" not in d for d in deltas)


def test_no_stop_trim_keeps_the_stop_string(detokenizer, tokenizer):
    ids = tokenizer(" 5, 6, 7, 8")["input_ids"]
    end = next(i for i in range(len(ids)) if "6, 7" in tokenizer.decode(ids[: i + 1]))
    s = spec(stop=("6, 7",), no_stop_trim=True)
    deltas = feed(detokenizer, ids[: end + 1], s, FinishReason(type="stop", matched="6, 7"))
    assert "".join(deltas) == " 5, 6, 7"


def test_partial_stop_prefix_is_held_back_then_released(detokenizer, tokenizer):
    # "6, 8" starts like the stop "6, 7" but is not it: the held text must come out once that is clear.
    ids = tokenizer(" 5, 6, 8, 9")["input_ids"]
    s = spec(stop=("6, 7",))
    deltas = feed(detokenizer, ids, s, LENGTH)
    assert "".join(deltas) == " 5, 6, 8, 9"
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert not emitted.endswith("6") and not emitted.endswith("6,")  # a possible stop start is held


def test_state_hold_back_directly():
    # advance() takes the decoded (prefix window, full window) pair, as the detokenizer computes it.
    state = DecodeState(spec(stop=("STOP",)))
    state.ids = [1, 2]
    state.advance("", "hello ST", final=False)
    assert state.take_delta(finished=False, matched_stop=None) == "hello "  # "ST" may begin STOP
    state.ids = [1, 2, 3]
    state.advance("hello ST", "hello STAR", final=False)
    assert state.take_delta(finished=False, matched_stop=None) == "STAR"
    state.ids = [1, 2, 3, 4]
    assert state.windows() == ([3], [3, 4])
    state.advance("AR", "ARSTOP and more", final=False)
    assert state.text == "hello STARSTOP and more"
    assert state.take_delta(finished=False, matched_stop=None) == ""  # nothing from the stop on
    assert state.take_delta(finished=True, matched_stop="STOP") == ""


def test_state_holds_an_incomplete_character():
    state = DecodeState(spec())
    state.ids = [1]
    state.advance("", "a\ufffd", final=False)
    assert state.take_delta(False, None) == ""
    state.ids = [1, 2]
    state.advance("", "aé", final=False)
    assert state.take_delta(False, None) == "aé"


def test_requests_with_different_options_in_one_batch(detokenizer, tokenizer):
    ids = tokenizer("Hi there")["input_ids"] + [2]  # ... <|im_end|>
    specs = [spec("plain"), spec("shown", skip=False)]
    batch = TokenBatch(
        rids=["plain", "shown"],
        new_token_ids=[ids, ids],
        finish=[LENGTH, LENGTH],
        prompt_tokens=[1, 1],
        cached_tokens=[0, 0],
        extras=[None, None],
        new_specs=specs,
    )
    assert batch_text(detokenizer, batch) == ["Hi there", "Hi there<|im_end|>"]


# ---- spaces_between_special_tokens ----


@pytest.fixture(scope="module")
def spacing_tokenizer():
    """A tiny WordPiece tokenizer: its decoder puts a space between tokens, special ones included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=["<x>"],
    )


def test_spaces_between_special_tokens_on_a_spacing_tokenizer(spacing_tokenizer):
    x = spacing_tokenizer.convert_tokens_to_ids("<x>")
    ids = [1, 3, 5, 2, 2, x, 4]  # [CLS] hello ##s [SEP] [SEP] <x> world
    decoder = TextDecoder(spacing_tokenizer)
    assert decoder.decode([ids], False, True) == ["[CLS] hellos [SEP] [SEP] <x> world"]
    assert decoder.decode([ids], False, False) == ["[CLS]hellos[SEP][SEP]<x>world"]
    assert decoder.decode([ids], True, False) == decoder.decode([ids], True, True) == ["hellos world"]


def test_spaces_option_reaches_the_stream(spacing_tokenizer):
    detokenizer = Detokenizer(spacing_tokenizer)
    ids = [1, 3, 2, 4, 2]
    joined = "".join(feed(detokenizer, ids, spec("off", skip=False, spaces=False), LENGTH))
    spaced = "".join(feed(detokenizer, ids, spec("on", skip=False, spaces=True), LENGTH))
    assert joined == "[CLS]hello[SEP]world[SEP]"
    assert spaced == "[CLS] hello [SEP] world [SEP]"


def test_spaces_option_leaves_byte_level_text_alone(tokenizer):
    ids = tokenizer("Hi")["input_ids"] + [2, 1] + tokenizer(" there")["input_ids"]
    decoder = TextDecoder(tokenizer)
    expected = ["Hi<|im_end|><|im_start|> there"]
    assert decoder.decode([ids], False, False) == decoder.decode([ids], False, True) == expected


@pytest.mark.parametrize("skip", [True, False])
def test_batch_decoding_equals_transformers(tokenizer, skip):
    """TextDecoder decodes through the Rust tokenizer in one call: the same text as transformers' batch_decode."""
    rng = random.Random(7)
    special = sorted(tokenizer.all_special_ids)
    id_lists = [
        [
            rng.choice(special) if rng.random() < 0.1 else rng.randrange(tokenizer.vocab_size)
            for _ in range(rng.randint(0, 12))
        ]
        for _ in range(64)
    ]
    assert TextDecoder(tokenizer)._decode_batch is not None  # the fast path is the one under test
    expected = tokenizer.batch_decode(id_lists, skip_special_tokens=skip)
    assert TextDecoder(tokenizer).decode(id_lists, skip, True) == expected
