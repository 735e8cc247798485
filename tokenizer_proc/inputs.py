"""Turning a caller's generate() arguments into checked GenerateRequests, in the caller's thread,
so that every mistake raises there (ValueError/TypeError naming the field) before anything is sent."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Optional, Union

from engine.protocol import GenerateRequest
from engine.sampling import SamplingParams, parse_sampling_params

_SEED_STRIDE = 0x9E3779B1  # spreads the seeds of the n samples of one prompt


@dataclass
class Limits:
    """What the running engine allows, learnt from the scheduler at start-up."""

    vocab_size: int
    context_length: int
    kv_pool_tokens: int


@dataclass
class PreparedBatch:
    reqs: list[GenerateRequest]
    single: bool  # the caller passed one prompt with n=1 (returns one output, not a list)


def prepare(
    tokenizer: Any,
    limits: Limits,
    prompt: Union[str, list[str], None],
    input_ids: Union[list[int], list[list[int]], None],
    sampling_params: Union[dict, list[dict], None],
    rid: Union[str, list[str], None],
    stream: bool,
    return_logprob: Union[bool, list[bool]],
    logprob_start_len: Union[int, list[int], None],
    top_logprobs_num: Union[int, list[int], None],
    return_text_in_logprobs: bool,
    return_hidden_states: bool,
) -> PreparedBatch:
    prompts_ids, single = _token_ids(tokenizer, prompt, input_ids, limits.vocab_size)
    count = len(prompts_ids)
    params = [parse_sampling_params(p, limits.vocab_size) for p in _per_prompt("sampling_params", sampling_params, count, dict)]
    rids = _per_prompt("rid", rid, count, str)
    logprob_flags = _per_prompt("return_logprob", return_logprob, count, bool)
    starts = _per_prompt("logprob_start_len", logprob_start_len, count, int)
    tops = _per_prompt("top_logprobs_num", top_logprobs_num, count, int)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be a bool, got {stream!r}")
    reqs: list[GenerateRequest] = []
    for i, ids in enumerate(prompts_ids):
        p = params[i]
        _check_length(ids, p, limits, i if not single else None)
        start = -1 if starts[i] is None else starts[i]
        top = 0 if tops[i] is None else tops[i]
        if start < -1 or start > len(ids):
            raise ValueError(f"logprob_start_len must be in [-1, {len(ids)}] for this prompt, got {start!r}")
        if top < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {top!r}")
        base_rid = rids[i] if rids[i] is not None else uuid.uuid4().hex
        for k in range(p.n):
            sample = p if p.n == 1 else _nth_sample(p, k)
            reqs.append(
                GenerateRequest(
                    rid=base_rid if p.n == 1 else f"{base_rid}-{k}",
                    input_ids=ids,
                    sampling=sample,
                    stream=stream,
                    return_logprob=bool(logprob_flags[i]),
                    logprob_start_len=start,
                    top_logprobs_num=top,
                    return_text_in_logprobs=return_text_in_logprobs,
                    return_hidden_states=return_hidden_states,
                )
            )
    if len({r.rid for r in reqs}) != len(reqs):
        raise ValueError("rid values must be unique within one call")
    return PreparedBatch(reqs=reqs, single=single and params[0].n == 1)


def _token_ids(tokenizer: Any, prompt: Any, input_ids: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt and input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            return [tokenizer(prompt)["input_ids"]], True
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {_short(prompt)}")
        return list(tokenizer(list(prompt))["input_ids"]), False
    if isinstance(input_ids, (list, tuple)) and input_ids and all(_is_int(t) for t in input_ids):
        batch, single = [list(input_ids)], True
    elif (
        isinstance(input_ids, (list, tuple))
        and input_ids
        and all(isinstance(row, (list, tuple)) and row and all(_is_int(t) for t in row) for row in input_ids)
    ):
        batch, single = [list(row) for row in input_ids], False
    else:
        raise TypeError(f"input_ids must be a non-empty list[int] or list[list[int]], got {_short(input_ids)}")
    for row in batch:
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"input_ids holds token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return batch, single


def _per_prompt(name: str, value: Any, count: int, kind: type) -> list[Any]:
    """A single value applies to every prompt; a list must have one entry per prompt."""
    if isinstance(value, list) and kind is not list:
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        values = value
    else:
        values = [value] * count
    for v in values:
        if v is not None and not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise TypeError(f"{name} must be a {kind.__name__} (or a list of them), got {_short(v)}")
    return values


def _check_length(ids: list[int], p: SamplingParams, limits: Limits, index: Optional[int]) -> None:
    where = "" if index is None else f" (prompt {index})"
    if not ids:
        raise ValueError(f"prompt{where} is empty after tokenization")
    total = len(ids) + p.max_new_tokens
    if total > limits.context_length:
        raise ValueError(
            f"prompt{where} has {len(ids)} tokens; with sampling_params.max_new_tokens={p.max_new_tokens} that is "
            f"{total} > the context length {limits.context_length}"
        )
    if total > limits.kv_pool_tokens:
        raise ValueError(
            f"prompt{where} has {len(ids)} tokens; with sampling_params.max_new_tokens={p.max_new_tokens} it needs "
            f"{total} KV slots, more than the whole KV pool ({limits.kv_pool_tokens})"
        )


def _nth_sample(p: SamplingParams, k: int) -> SamplingParams:
    import msgspec

    seed = None if p.seed is None else (p.seed + k * _SEED_STRIDE) % (1 << 62)
    return msgspec.structs.replace(p, n=1, seed=seed)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
