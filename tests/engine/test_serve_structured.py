"""Structured output over HTTP, live on loopback with the default model: response_format json_schema and
json_object on chat and completions through the official openai client (its parse() helper too), SGLang's
regex / ebnf fields, the native /generate taking the sampling parameters as they are, and bad constraints
answered 400 naming the field while the server keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from test_serve import API_KEY, CHAT, LiveServer

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person (name and age) as JSON."}]


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("serve") / "server.log"), "--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_chat_json_schema_through_the_openai_client(client):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = client.chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=64, response_format=schema_format
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=64, response_format=schema_format, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2 and "".join(pieces) == choice.message.content


def test_the_clients_parse_helper_gets_its_pydantic_model(client):
    parsed = client.chat.completions.parse(
        model="any", messages=ASK, temperature=0.7, seed=3, max_tokens=64, response_format=Person, n=2
    )
    assert len(parsed.choices) == 2
    for choice in parsed.choices:
        assert isinstance(choice.message.parsed, Person)


def test_json_object_on_completions_and_chat(client):
    completion = client.completions.create(
        model="any",
        prompt="A JSON object with a cat's name and age:",
        temperature=0,
        max_tokens=64,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)
    chat = client.chat.completions.create(
        model="any", messages=ASK, temperature=0, max_tokens=64, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(chat.choices[0].message.content), dict)


def test_sglangs_regex_and_ebnf_fields_and_native_generate(client, http):
    completion = client.completions.create(
        model="any", prompt="My phone number is", temperature=0, max_tokens=24, extra_body={"regex": r"\d{3}-\d{4}"}
    )
    assert re.fullmatch(r"\d{3}-\d{4}", completion.choices[0].text)
    chat = client.chat.completions.create(
        model="any", messages=CHAT, temperature=0, max_tokens=8, extra_body={"ebnf": 'root ::= "Paris" | "Lyon"'}
    )
    assert chat.choices[0].message.content in ("Paris", "Lyon") and chat.choices[0].finish_reason == "stop"
    body = {
        "text": "The year is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 8, "regex": "(19|20)[0-9]{2}"},
    }
    native = http.post("/generate", json=body)
    assert native.status_code == 200 and re.fullmatch("(19|20)[0-9]{2}", native.json()["text"])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = {
        "text": "Status as JSON:",
        "sampling_params": {"temperature": 0, "max_new_tokens": 16, "json_schema": schema},
    }
    native = http.post("/generate", json=body)
    assert native.status_code == 200 and isinstance(json.loads(native.json()["text"])["ok"], bool)


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectt"}}}},
            "response_format",
        ),
        ("/v1/completions", {"regex": "(ab"}, "regex"),
        ("/v1/completions", {"ebnf": "root ::= nothing"}, "ebnf"),
        ("/v1/completions", {"regex": "a+", "response_format": {"type": "json_object"}}, "response_format"),
        ("/generate", {"sampling_params": {"json_schema": "{oops"}}, "sampling_params.json_schema"),
    ],
)
def test_bad_constraints_get_400_naming_the_field(http, path, extra, param):
    base = {
        "/generate": {"text": "hi"},
        "/v1/completions": {"prompt": "hi"},
        "/v1/chat/completions": {"messages": CHAT},
    }
    response = http.post(path, json=base[path] | ({"max_tokens": 4} if path.startswith("/v1/") else {}) | extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    good = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2, "regex": "[a-z]+"}})
    assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] >= 1
