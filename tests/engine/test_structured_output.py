"""Structured output on the default model (one engine, overlap on, prefix cache on): json_schema outputs
parse and validate (jsonschema) for schemas of many shapes, greedy and sampled; regex and EBNF outputs match;
a free request beside constrained ones is what it is alone; n > 1, streaming, prefix-cache hits, logprobs of
the constrained distribution and the other sampling parameters work with a constraint; bad constraints raise
ValueError naming the field and the engine keeps serving."""

from __future__ import annotations

import asyncio
import json
import math
import re

import jsonschema
import pytest
from reference import assert_pool_free

from engine import Engine

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "array-min-max": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}},
        "required": ["colors"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "string", "enum": ["low", "high"]},
        },
        "required": ["sentiment", "confidence"],
    },
    "number-bounds": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["temperature", "humidity"],
    },
    "optional-fields": {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "director": {"type": "string"}},
        "required": ["title"],
    },
    "any-of": {
        "type": "object",
        "properties": {
            "id": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "value": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        },
        "required": ["id", "value"],
    },
    "array-of-objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"item": {"type": "string"}, "price": {"type": "number", "minimum": 0}},
            "required": ["item", "price"],
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "bool-const-bounded-strings": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "version": {"const": 2},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
        },
        "required": ["ok", "version", "tags"],
    },
}
SCHEMA_PROMPTS = {
    "flat": "Describe a person as JSON with name and age:",
    "nested": "Give a person's name and address (city and zip code) as JSON:",
    "array-min-max": "List some colors as JSON:",
    "enum": "Classify the sentiment of 'I love this!' as JSON:",
    "number-bounds": "Report today's weather as JSON:",
    "optional-fields": "Describe a movie as JSON:",
    "any-of": "Give an id and a value as JSON:",
    "array-of-objects": "A shopping list with prices as JSON:",
    "bool-const-bounded-strings": "A status report as JSON:",
}
# (prompt, kind, constraint, a Python regex its outputs fullmatch)
TEXT_CASES = [
    ("My phone number is", "regex", r"\(\d{3}\) \d{3}-\d{4}", None),
    ("Today's date in ISO format is", "regex", r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", None),
    ("Write an email address:", "regex", r"[a-z]{2,12}@[a-z]{2,10}\.(com|org|net)", None),
    ("Will it rain tomorrow? Answer:", "regex", r" ?(yes|no|maybe)", None),
    (
        "Greet someone:",
        "ebnf",
        'root ::= greeting " " name "!"\ngreeting ::= "Hello" | "Hi" | "Dear"\nname ::= [A-Z] [a-z]{1,10}',
        r"(Hello|Hi|Dear) [A-Z][a-z]{1,10}!",
    ),
    (
        "A list of three fruits:",
        "ebnf",
        'root ::= "[" item (", " item){2} "]"\nitem ::= "\\"" [a-z]{2,12} "\\""',
        r'\["[a-z]{2,12}"(, "[a-z]{2,12}"){2}\]',
    ),
]
GREEDY = {"temperature": 0, "max_new_tokens": 96}
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 11, "max_new_tokens": 96}
YES_NO = 'root ::= " yes" | " no"'


def token_paths(tokenizer, text: str) -> set[int]:
    """Tokens that can start `text`: those whose text is a prefix of it."""
    texts = tokenizer.batch_decode([[t] for t in range(len(tokenizer))])
    return {t for t, piece in enumerate(texts) if piece and text.startswith(piece)}


@pytest.fixture(scope="module")
def engine():
    with Engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def schema_outputs(engine) -> dict[str, list[dict]]:
    names = list(SCHEMAS)
    prompts = [SCHEMA_PROMPTS[n] for n in names] * 2
    # One as a dict (the engine serialises it), the rest as the JSON text SGLang takes.
    params = [
        mode | {"json_schema": SCHEMAS[n] if n == "flat" else json.dumps(SCHEMAS[n])}
        for mode in (GREEDY, SAMPLED)
        for n in names
    ]
    outputs = engine.generate(prompts, params)
    return {"greedy": outputs[: len(names)], "sampled": outputs[len(names) :]}


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_json_schema_outputs_parse_and_validate(schema_outputs, mode):
    for name, output in zip(SCHEMAS, schema_outputs[mode]):
        assert output["meta_info"]["finish_reason"]["type"] == "stop", (name, output["text"])
        jsonschema.validate(json.loads(output["text"]), SCHEMAS[name])


@pytest.mark.parametrize("mode", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_regex_and_ebnf_outputs_match(engine, mode):
    params = [mode | {kind: constraint} for _, kind, constraint, _ in TEXT_CASES]
    outputs = engine.generate([case[0] for case in TEXT_CASES], params)
    for (_, _, constraint, equivalent), output in zip(TEXT_CASES, outputs):
        assert output["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(equivalent or constraint, output["text"]), (constraint, output["text"])


def test_a_free_request_beside_constrained_ones_is_what_it_is_alone(engine):
    free_prompts = ["The capital of France is", "Once upon a time,"]
    free_params = [{"temperature": 0, "max_new_tokens": 24}, {"temperature": 0.9, "seed": 4, "max_new_tokens": 24}]
    alone = engine.generate(free_prompts, free_params)
    constrained = [{"temperature": 0, "max_new_tokens": 24, "regex": r"[0-9]{3,8}"}] * 2
    mixed = engine.generate(free_prompts + ["Pick a number:"] * 2, free_params + constrained)
    for a, m in zip(alone, mixed):
        assert m["output_ids"] == a["output_ids"] and m["text"] == a["text"]
    assert all(re.fullmatch(r"[0-9]{3,8}", m["text"]) for m in mixed[2:])


def test_n_samples_each_follow_the_schema_compiled_once(engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    before = engine.get_server_info()["grammars_compiled"]
    params = {"temperature": 1.0, "seed": 5, "n": 4, "max_new_tokens": 48, "json_schema": json.dumps(schema)}
    outputs = engine.generate("Name a city as JSON:", params)
    assert len(outputs) == 4 and len({o["text"] for o in outputs}) > 1
    for output in outputs:
        jsonschema.validate(json.loads(output["text"]), schema)
    assert engine.get_server_info()["grammars_compiled"] == before + 1


def test_streamed_constrained_output_is_the_whole_in_pieces(engine):
    params = GREEDY | {"json_schema": json.dumps(SCHEMAS["nested"])}
    whole = engine.generate(SCHEMA_PROMPTS["nested"], params)
    chunks = list(engine.generate(SCHEMA_PROMPTS["nested"], params, stream=True))
    assert len(chunks) > 2 and "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "stop"
    jsonschema.validate(json.loads(whole["text"]), SCHEMAS["nested"])


def test_prefix_cache_hit_gives_the_same_constrained_output(engine):
    prompt = "Here is a long description of a person, with many details about them. " * 4 + "As JSON:"
    params = GREEDY | {"json_schema": json.dumps(SCHEMAS["flat"])}
    first, second = engine.generate(prompt, params), engine.generate(prompt, params)
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["output_ids"] == first["output_ids"]
    jsonschema.validate(json.loads(second["text"]), SCHEMAS["flat"])


def test_logprobs_are_of_the_constrained_distribution(engine, tokenizer):
    output = engine.generate(
        "Is the sky blue? Answer:",
        {"temperature": 0, "max_new_tokens": 8, "ebnf": YES_NO},
        return_logprob=True,
        top_logprobs_num=20,
    )
    first_top = output["meta_info"]["output_top_logprobs"][0]
    allowed = token_paths(tokenizer, " yes") | token_paths(tokenizer, " no")
    assert 1 < len(first_top) < 20  # only the tokens the grammar allows are candidates
    assert {t for _, t, _ in first_top} <= allowed
    assert sum(math.exp(lp) for lp, _, _ in first_top) == pytest.approx(1.0, abs=1e-3)
    chosen_lp, chosen, _ = output["meta_info"]["output_token_logprobs"][0]
    assert chosen_lp == pytest.approx(dict((t, lp) for lp, t, _ in first_top)[chosen], abs=1e-5)
    assert output["text"] in (" yes", " no")


def test_sampling_parameters_apply_together_with_the_mask(engine, tokenizer):
    cat_paths = token_paths(tokenizer, "cat")
    cases = [
        # logit_bias bans every way to start "cat": the grammar's other branch is taken
        ({"temperature": 0, "regex": "(cat|dog)", "logit_bias": {t: -math.inf for t in cat_paths}}, "dog"),
        # min_new_tokens cannot outlast a grammar that is complete: the grammar wins
        ({"temperature": 0, "ebnf": YES_NO, "min_new_tokens": 5}, None),
        # ignore_eos: the request still ends when the grammar does
        ({"temperature": 0, "regex": "[0-9]{4}", "ignore_eos": True}, None),
        ({"temperature": 1.2, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 1, "regex": "[a-z]{3,9}"}, None),
        (
            {"temperature": 0.7, "seed": 2, "repetition_penalty": 1.3, "frequency_penalty": 1.0, "regex": "(ab){2,6}"},
            None,
        ),
    ]
    outputs = engine.generate(["Name an animal:"] * len(cases), [p | {"max_new_tokens": 16} for p, _ in cases])
    patterns = ["(cat|dog)", " (yes|no)", "[0-9]{4}", "[a-z]{3,9}", "(ab){2,6}"]
    for (params, want), pattern, output in zip(cases, patterns, outputs):
        assert output["meta_info"]["finish_reason"]["type"] == "stop", (params, output)
        assert re.fullmatch(pattern, output["text"]), (params, output["text"])
        assert want is None or output["text"] == want
    cut = engine.generate("Digits:", {"temperature": 0, "regex": "[0-9]{20}", "max_new_tokens": 5})
    assert cut["meta_info"]["finish_reason"]["type"] == "length" and re.fullmatch("[0-9]{5}", cut["text"])


BAD = [
    ({"json_schema": "{not json"}, ["sampling_params.json_schema", "not valid JSON"]),
    ({"json_schema": '{"type": "objectt"}'}, ["sampling_params.json_schema", "cannot be compiled", "objectt"]),
    ({"json_schema": "[1, 2]"}, ["sampling_params.json_schema", "JSON object"]),
    ({"regex": "(ab"}, ["sampling_params.regex", "not a valid regex"]),
    ({"ebnf": 'root ::= "a" missing'}, ["sampling_params.ebnf", "cannot be compiled", "missing"]),
    ({"ebnf": 'start ::= "a"'}, ["sampling_params.ebnf", "root"]),
    ({"regex": "a+", "ebnf": 'root ::= "a"'}, ["sampling_params.regex", "sampling_params.ebnf", "at most one"]),
    ({"regex": ""}, ["sampling_params.regex", "empty"]),
]


@pytest.mark.parametrize("params, words", BAD, ids=[f"bad-{i}" for i in range(len(BAD))])
def test_a_bad_constraint_raises_naming_its_field(engine, params, words):
    with pytest.raises(ValueError) as info:
        engine.generate("Hello", {"max_new_tokens": 4} | params)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_wrong_types_raise_and_the_engine_keeps_serving(engine):
    with pytest.raises(TypeError, match="sampling_params.regex must be a string"):
        engine.generate("Hello", {"regex": 5})
    with pytest.raises(ValueError, match="sampling_params.json_schema"):  # the async path checks in a thread

        async def bad() -> None:
            await engine.async_generate("Hello", {"json_schema": "{"})

        asyncio.run(bad())
    with pytest.raises(ValueError, match="did you mean 'json_schema'"):
        engine.generate("Hello", {"guided_json": "{}"})
    output = engine.generate("Answer:", {"temperature": 0, "max_new_tokens": 8, "ebnf": YES_NO})
    assert output["text"] in (" yes", " no")
    info = assert_pool_free(engine)
    assert info["num_compiling_grammars"] == 0
