"""SamplingParams: the per-request generation controls, their defaults (SGLang's) and validation."""

from __future__ import annotations

import difflib
import json
import math
from typing import Any, Optional

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    """How to generate for one prompt. Pass it to `Engine.generate` as a dict with these keys, or as an object.

    - max_new_tokens: most tokens to generate (default 128).
    - min_new_tokens: EOS and stop tokens are held back until this many tokens exist (default 0).
    - temperature: 0 means greedy; otherwise logits are divided by it (default 1.0).
    - top_p, top_k, min_p: nucleus, top-k (-1 = off) and min-p filtering (defaults 1.0, -1, 0.0).
    - frequency_penalty, presence_penalty (in [-2, 2]) and repetition_penalty (in (0, 2], 1 = off):
      penalise tokens already generated, as in OpenAI's API and HF transformers respectively.
    - stop: a string or list of strings; generation ends when one appears in the generated text (even
      split across tokens), which is cut before it unless no_stop_trim; finish_reason.matched names it.
    - stop_token_ids: token ids that end generation (finish_reason.matched is the id; the token stays in
      output_ids, and in the text unless it is a special token that skip_special_tokens drops).
    - ignore_eos: keep generating past the end-of-sequence token.
    - skip_special_tokens: drop special tokens from the text (default True).
    - spaces_between_special_tokens: False joins added/special tokens and the text around them with
      no space, as HF's slow tokenizers do; True (default) keeps the tokenizer's own decoding.
    - n: number of samples of the prompt, each returned as its own output (prompt-major for a list).
    - seed: the same prompt, parameters and seed give the same tokens, alone or in any batch; with n > 1
      sample 0 uses the seed itself and the others seeds derived from it.
    - logit_bias: {token_id: bias} added to the raw logits before penalties and sampling; -inf bans.
    - json_schema (a JSON Schema, as a string or a dict), regex (a Python-style regex) or ebnf (a grammar in
      xgrammar's EBNF dialect, root rule `root`): at most one per request. Every token is then one the
      constraint allows, and the request ends (finish_reason "stop") once the output is complete.
    Logprobs, when asked, are taken before all of these (log-softmax of the raw logits); for a constrained
    request, of the logits with the tokens the constraint forbids masked out.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def constraint(self) -> Optional[tuple[str, str]]:
        """(kind, text) of the request's output constraint: kind is one of CONSTRAINT_FIELDS; None when free."""
        for kind in CONSTRAINT_FIELDS:
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None


FIELDS = SamplingParams.__struct_fields__
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf")  # SGLang's names
# vLLM's and OpenAI's names for our keys: the first thing a user coming from them types.
_OTHER_NAMES = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "include_stop_str_in_output": "no_stop_trim",
    "stop_sequences": "stop",
    "random_seed": "seed",
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_grammar": "ebnf",
    "grammar": "ebnf",
}


def parse_sampling_params(raw: Any, vocab_size: int) -> SamplingParams:
    """Check a user's sampling dict (or None) and return SamplingParams; ValueError/TypeError name the field."""
    if raw is None:
        return SamplingParams()
    if isinstance(raw, SamplingParams):
        raw = msgspec.structs.asdict(raw)
    if not isinstance(raw, dict):
        raise TypeError(f"sampling_params must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS), key=str)
    if unknown:
        hints = "; ".join(_unknown_key(key) for key in unknown)
        raise ValueError(f"sampling_params: {hints}; valid keys are {sorted(FIELDS)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None and name not in ("seed", "logit_bias", "stop", "stop_token_ids"):
            continue  # None means "the default", as in SGLang
        values[name] = _check_type(name, value)
    params = SamplingParams(**values)
    _check_ranges(params, vocab_size)
    return params


def _unknown_key(key: Any) -> str:
    guess = _OTHER_NAMES.get(key) if isinstance(key, str) else None
    if guess is None and isinstance(key, str):
        guess = next(iter(difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)), None)
    return f"unknown key {key!r}" + (f" (did you mean {guess!r}?)" if guess else "")


def _check_type(name: str, value: Any) -> Any:
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"sampling_params.{name} must be an int, got {value!r}")
        return value
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"sampling_params.{name} must be a number, got {value!r}")
        return float(value)
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise TypeError(f"sampling_params.{name} must be a bool, got {value!r}")
        return value
    if name == "stop":
        value = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
            raise TypeError(f"sampling_params.stop must be a non-empty string or a list of them, got {value!r}")
        return list(value)
    if name == "stop_token_ids":
        value = [] if value is None else value
        if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
            raise TypeError(f"sampling_params.stop_token_ids must be a list of ints, got {value!r}")
        return list(value)
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"sampling_params.seed must be an int or None, got {value!r}")
        return value
    if name == "logit_bias":
        return _check_logit_bias(value)
    if name in CONSTRAINT_FIELDS:
        return _check_constraint_type(name, value)
    raise AssertionError(name)


def _check_constraint_type(name: str, value: Any) -> str:
    if name == "json_schema" and isinstance(value, dict):
        try:
            return json.dumps(value)  # a schema given as a dict: the same text every time, so it caches
        except (TypeError, ValueError) as exc:
            raise TypeError(f"sampling_params.json_schema must be JSON (a dict of JSON values): {exc}") from None
    if not isinstance(value, str):
        kinds = "a string (or a dict)" if name == "json_schema" else "a string"
        raise TypeError(f"sampling_params.{name} must be {kinds}, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"sampling_params.{name} must not be empty")
    return value


def _check_logit_bias(value: Any) -> Optional[dict[int, float]]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"sampling_params.logit_bias must be a dict of token id -> bias, got {value!r}")
    bias: dict[int, float] = {}
    for key, b in value.items():
        token = _token_key(key)
        if token is None:
            raise TypeError(f"sampling_params.logit_bias key {key!r} is not a token id")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"sampling_params.logit_bias[{key!r}] must be a number, got {b!r}")
        bias[token] = float(b)
    return bias


def _token_key(key: Any) -> Optional[int]:
    """A logit_bias key as a token id: an int, or its decimal string (JSON callers send string keys)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


def _check_ranges(p: SamplingParams, vocab_size: int) -> None:
    def bad(name: str, value: Any, rule: str) -> ValueError:
        return ValueError(f"sampling_params.{name} must be {rule}, got {value!r}")

    if p.max_new_tokens < 0:
        raise bad("max_new_tokens", p.max_new_tokens, ">= 0")
    if p.min_new_tokens < 0 or p.min_new_tokens > p.max_new_tokens:
        raise bad("min_new_tokens", p.min_new_tokens, f"in [0, max_new_tokens={p.max_new_tokens}]")
    if not 0.0 <= p.temperature < math.inf:
        raise bad("temperature", p.temperature, "a finite number >= 0")
    if not 0.0 < p.top_p <= 1.0:
        raise bad("top_p", p.top_p, "in (0, 1]")
    if p.top_k == 0 or p.top_k < -1:
        raise bad("top_k", p.top_k, "-1 (off) or >= 1")
    if not 0.0 <= p.min_p <= 1.0:
        raise bad("min_p", p.min_p, "in [0, 1]")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(p, name) <= 2.0:
            raise bad(name, getattr(p, name), "in [-2, 2]")
    if not 0.0 < p.repetition_penalty <= 2.0:
        raise bad("repetition_penalty", p.repetition_penalty, "in (0, 2]")
    if p.n < 1:
        raise bad("n", p.n, ">= 1")
    given = [name for name in CONSTRAINT_FIELDS if getattr(p, name) is not None]
    if len(given) > 1:
        names = " and ".join(f"sampling_params.{name}" for name in given)
        raise ValueError(f"{names} were given together: a request takes at most one constraint")
    if p.seed is not None and not -(1 << 63) <= p.seed < 1 << 63:
        raise bad("seed", p.seed, "a 64-bit int")
    for token in p.stop_token_ids:
        if not 0 <= token < vocab_size:
            raise bad("stop_token_ids", token, f"a token id in [0, {vocab_size})")
    for token, value in (p.logit_bias or {}).items():
        if not 0 <= token < vocab_size:
            raise bad("logit_bias", token, f"keyed by token ids in [0, {vocab_size})")
        if not -math.inf <= value < math.inf:  # -inf bans a token; +inf or NaN would poison the softmax
            raise bad(f"logit_bias[{token}]", value, "a finite number or -inf")
