"""OpenAI's API format: request bodies (strict: unknown fields and wrong types are 400s naming the field)
and their engine sampling params; answers built from engine outputs, whole or as stream chunks, with usage
and logprobs in the API's two shapes."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Engine names -> OpenAI names, for error messages about a request.
ENGINE_TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "json_schema": "response_format"}
_ANY_OBJECT = '{"type": "object"}'  # what {"type": "json_object"} asks for, as SGLang reads it
# Request fields passed to the engine's sampling params under the same name.
_SAME_NAMED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "no_stop_trim",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """response_format.json_schema: the schema the reply follows (strict or not: ours always is)."""

    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    """response_format: "text" (free), "json_object" (any JSON object) or "json_schema" (its schema's)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({name, schema, strict})")
        return self

    def engine_schema(self) -> Optional[str]:
        """The engine's sampling_params.json_schema; None for free text."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return _ANY_OBJECT if schema is None else json.dumps(schema)


class SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None  # any name or none: there is one model, answered under its served name (as SGLang)
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = None
    n: int = Field(1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # Beyond OpenAI, as vLLM and SGLang accept them (the openai client sends them through extra_body).
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    regex: Optional[str] = None  # SGLang's: the reply matches it
    ebnf: Optional[str] = None  # SGLang's: the reply follows this grammar (xgrammar's EBNF, root rule `root`)

    def sampling_params(self, max_tokens: Optional[int]) -> dict[str, Any]:
        """The engine's sampling dict; fields left out keep the engine's defaults."""
        params = {
            "max_new_tokens": max_tokens,
            "min_new_tokens": self.min_tokens,
            "n": self.n,
            "stop": self.stop,
            "logit_bias": self.logit_bias,
            "json_schema": self.response_format.engine_schema() if self.response_format is not None else None,
            "regex": self.regex,
            "ebnf": self.ebnf,
        }
        for name in _SAME_NAMED:
            params[name] = getattr(self, name)
        return {name: value for name, value in params.items() if value is not None}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions. max_tokens defaults to 16, as in OpenAI's API."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def check_image_url(url: str) -> str:
    """Images reach the server as data: or http(s) URLs only: a file path would read the server's disk."""
    if not url.startswith(("data:", "http://", "https://")):
        raise ValueError("an image must be a data: URL or an http(s) URL")
    return url


class ImageUrl(_Strict):
    url: str
    detail: Optional[str] = None  # accepted for OpenAI compatibility; the model's own preprocessing decides

    _check_url = field_validator("url")(check_image_url)


class ImageUrlPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[Union[TextPart, ImageUrlPart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    def as_template_input(self) -> dict[str, Any]:
        content: Any = self.content
        if isinstance(content, list) and any(isinstance(part, ImageUrlPart) for part in content):
            content = [part.model_dump(exclude_none=True) for part in content]  # the chat template places images
        elif isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. max_tokens (or max_completion_tokens) defaults to the engine's default."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class Answer:
    """One request's OpenAI answer, whole or as stream chunks; counts usage either way."""

    object_whole = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, body: SamplingFields, model: str, request_id: str) -> None:
        self.body = body
        self.id = f"{self.id_prefix}-{request_id}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def envelope(self, choices: list[dict[str, Any]], whole: bool = False) -> dict[str, Any]:
        kind = self.object_whole if whole else self.object_chunk
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def whole(self, outputs: list[dict[str, Any]]) -> dict[str, Any]:
        for index, output in enumerate(outputs):
            self._count(index, output["meta_info"])
        choices = [self.whole_choice(index, output) for index, output in enumerate(outputs)]
        return self.envelope(choices, whole=True) | {"usage": self.usage()}

    def chunk(self, chunk: dict[str, Any]) -> Optional[dict[str, Any]]:
        index = chunk.get("index", 0)
        if chunk["meta_info"]["finish_reason"] is not None:
            self._count(index, chunk["meta_info"])
        choice = self.chunk_choice(index, chunk)
        return None if choice is None else self.envelope([choice])

    def _count(self, index: int, meta: dict[str, Any]) -> None:
        self.completion_tokens += meta["completion_tokens"]
        if index % self.body.n == 0:  # the n samples of a prompt share it: count it once, as OpenAI does
            self.prompt_tokens += meta["prompt_tokens"]

    def whole_choice(self, index: int, output: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_choice(self, index: int, chunk: dict[str, Any]) -> Optional[dict[str, Any]]:
        raise NotImplementedError


class CompletionAnswer(Answer):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, body: CompletionRequest, model: str, request_id: str, echo: Optional[list[str]]) -> None:
        super().__init__(body, model, request_id)
        self.echo = echo
        self.text_offsets: dict[int, int] = {}
        self.started: set[int] = set()

    def _choice(self, index: int, output: dict[str, Any]) -> dict[str, Any]:
        text = output["text"]
        if self.echo is not None and index not in self.started:
            text = self.echo[index // self.body.n] + text
        self.started.add(index)
        logprobs = None
        if self.body.logprobs is not None:
            offset = self.text_offsets.get(index, 0)
            logprobs = completion_logprobs(output["meta_info"], offset)
            self.text_offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        meta = output["meta_info"]
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason(meta["finish_reason"]),
        }

    def whole_choice(self, index: int, output: dict[str, Any]) -> dict[str, Any]:
        return self._choice(index, output)

    def chunk_choice(self, index: int, chunk: dict[str, Any]) -> Optional[dict[str, Any]]:
        if not chunk["text"] and chunk["meta_info"]["finish_reason"] is None and self.body.logprobs is None:
            return None  # tokens that do not make a whole character yet
        return self._choice(index, chunk)


class ChatAnswer(Answer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, body: ChatCompletionRequest, model: str, request_id: str) -> None:
        super().__init__(body, model, request_id)
        self.started: set[int] = set()

    def whole_choice(self, index: int, output: dict[str, Any]) -> dict[str, Any]:
        meta = output["meta_info"]
        return {
            "index": index,
            "message": {"role": "assistant", "content": output["text"]},
            "logprobs": chat_logprobs(meta) if self.body.logprobs else None,
            "finish_reason": finish_reason(meta["finish_reason"]),
        }

    def chunk_choice(self, index: int, chunk: dict[str, Any]) -> Optional[dict[str, Any]]:
        meta = chunk["meta_info"]
        first = index not in self.started
        if not (first or chunk["text"] or meta["finish_reason"] is not None or self.body.logprobs):
            return None
        self.started.add(index)
        delta: dict[str, Any] = {"role": "assistant", "content": chunk["text"]} if first else {"content": chunk["text"]}
        return {
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(meta) if self.body.logprobs else None,
            "finish_reason": finish_reason(meta["finish_reason"]),
        }


def finish_reason(finish: Optional[dict[str, Any]]) -> Optional[str]:
    """The engine's {"type": "stop" | "length" | "abort", ...} as OpenAI's finish_reason."""
    return None if finish is None else finish["type"]


def completion_logprobs(meta: dict[str, Any], text_offset: int) -> dict[str, Any]:
    """Completions API logprobs of one (delta) output; offsets count from `text_offset`."""
    tokens, logprobs, offsets = [], [], []
    for logprob, _, text in meta.get("output_token_logprobs", []):
        tokens.append(text)
        logprobs.append(logprob)
        offsets.append(text_offset)
        text_offset += len(text)
    tops = meta.get("output_top_logprobs")
    top = [{text: lp for lp, _, text in position} for position in tops] if tops else [{} for _ in tokens]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(meta: dict[str, Any]) -> dict[str, Any]:
    """Chat API logprobs of one (delta) output."""
    tops = meta.get("output_top_logprobs") or [[] for _ in meta.get("output_token_logprobs", [])]
    content = []
    for (logprob, _, text), position in zip(meta.get("output_token_logprobs", []), tops):
        content.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for lp, _, t in position],
            }
        )
    return {"content": content}
