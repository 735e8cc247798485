"""Turning a generate() call's inputs (GenerateInput) into checked GenerateRequests, in the caller's thread,
so that every mistake raises there (ValueError/TypeError naming the field) before anything is sent;
a bad image found after earlier slices went out raises too, and the caller aborts those slices."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgspec

from engine.shared.errors import short_repr
from engine.shared.protocol import GenerateRequest, ImageInput
from engine.shared.sampling import SamplingParams, parse_sampling_params
from tokenizer_proc.constraints import check_constraint
from tokenizer_proc.image_placement import expand_placeholders, images_per_prompt
from tokenizer_proc.images import ImageProcessor

_SEED_STRIDE = 0x9E3779B1  # spreads the seeds of the n samples of one prompt
# Requests per slice of an image batch: enough for a first prefill step's worth of work, small enough
# that the scheduler starts while most images are still being preprocessed.
_SLICE_REQUESTS = 16

Prompt = Union[str, list[str], None]
InputIds = Union[list[int], list[list[int]], None]
SamplingArg = Union[dict[str, Any], list[dict[str, Any]], None]


@dataclass
class GenerateInput:
    """One generate() call's inputs, under SGLang's names, as the caller gave them; `prepare` checks
    them. A per-prompt field takes one value for every prompt or a list with one entry per prompt."""

    prompt: Prompt = None
    input_ids: InputIds = None
    sampling_params: SamplingArg = None
    image_data: Any = None  # see image_placement.images_per_prompt
    rid: Union[str, list[str], None] = None
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False
    logprob_start_len: Union[int, list[int], None] = None
    top_logprobs_num: Union[int, list[int], None] = None
    return_text_in_logprobs: bool = False
    return_hidden_states: Optional[bool] = None  # None: the engine's return_hidden_states setting
    embed: bool = False  # encode(): each prompt's pooled hidden state, nothing generated


@dataclass
class Limits:
    """What the running engine allows, learnt from the scheduler at start-up."""

    vocab_size: int
    context_length: int
    kv_pool_tokens: int


@dataclass
class PreparedBatch:
    """A call's requests, in slices to send one after another: one slice when no prompt has images.
    With images, each slice comes as its prompts' images finish preprocessing, so the scheduler starts
    on the first prompts while later images are still being processed; an image that fails raises from
    the iteration (the caller then aborts what it sent)."""

    slices: Iterator[list[GenerateRequest]]
    size: int  # requests in all slices together
    single: bool  # the caller passed one prompt with n=1 (returns one output, not a list)

    def all(self) -> list[GenerateRequest]:
        return [req for part in self.slices for req in part]


def prepare(
    tokenizer: Any, limits: Limits, call: GenerateInput, image_processor: Optional[ImageProcessor]
) -> PreparedBatch:
    """The call's inputs, checked, as GenerateRequests (n > 1: one per sample). Everything but the
    images is checked here; images are loaded, preprocessed and their placeholders expanded as the
    slices are taken. image_processor is None for a text-only model."""
    prompts_ids, single = _token_ids(tokenizer, call.prompt, call.input_ids, limits.vocab_size)
    per_prompt = images_per_prompt(call.image_data, len(prompts_ids), single)
    if image_processor is None and any(per_prompt):
        raise ValueError("image_data was given, but this model takes no images (not a vision-language model)")
    checked = _CheckedCall(call, limits, len(prompts_ids), single)
    one = single and checked.params[0].n == 1
    if image_processor is None:
        reqs = [req for i, ids in enumerate(prompts_ids) for req in checked.requests(i, ids, [])]
        return PreparedBatch(slices=iter([reqs]), size=checked.size, single=one)
    # A vision-language model: even a prompt without images is checked for stray placeholders.
    slices = _image_slices(image_processor, prompts_ids, per_prompt, single, checked.requests)
    return PreparedBatch(slices=slices, size=checked.size, single=one)


class _CheckedCall:
    """A call's options, checked, one entry per prompt; builds each prompt's requests once its token ids
    are final (for a vision-language model, after its image placeholders are expanded)."""

    def __init__(self, call: GenerateInput, limits: Limits, count: int, single: bool) -> None:
        self.call, self.limits, self.single = call, limits, single
        raw_params = _per_prompt("sampling_params", call.sampling_params, count, (dict, SamplingParams))
        self.params = [parse_sampling_params(p, limits.vocab_size) for p in raw_params]
        for p in self.params:
            check_constraint(p)
        rids = _per_prompt("rid", call.rid, count, str)
        self.logprob_flags = _per_prompt("return_logprob", call.return_logprob, count, bool)
        starts = _per_prompt("logprob_start_len", call.logprob_start_len, count, int)
        self.starts = [-1 if s is None else s for s in starts]
        self.tops = [0 if t is None else t for t in _per_prompt("top_logprobs_num", call.top_logprobs_num, count, int)]
        if not isinstance(call.stream, bool):
            raise TypeError(f"stream must be a bool, got {call.stream!r}")
        if not isinstance(call.return_text_in_logprobs, bool):
            raise TypeError(f"return_text_in_logprobs must be a bool, got {short_repr(call.return_text_in_logprobs)}")
        if not isinstance(call.return_hidden_states, bool):
            raise TypeError(f"return_hidden_states must be a bool, got {short_repr(call.return_hidden_states)}")
        for top in self.tops:
            if not 0 <= top <= limits.vocab_size:
                raise ValueError(f"top_logprobs_num must be in [0, {limits.vocab_size}], got {top!r}")
        # Prompt i's requests' rids: the caller's (or a fresh) rid, suffixed with the sample index when n > 1.
        bases = [r if r is not None else uuid.uuid4().hex for r in rids]
        self.rids = [[base] if p.n == 1 else [f"{base}-{k}" for k in range(p.n)] for base, p in zip(bases, self.params)]
        all_rids = [r for group in self.rids for r in group]
        if len(set(all_rids)) != len(all_rids):
            raise ValueError("rid values must be unique within one call")
        self.size = len(all_rids)

    def requests(self, i: int, ids: list[int], images: list[ImageInput]) -> list[GenerateRequest]:
        """Prompt i's requests, once its image tokens are in ids."""
        p, start, call = self.params[i], self.starts[i], self.call
        _check_length(ids, p, self.limits, i if not self.single else None, bool(images))
        if start < -1 or start > len(ids):
            raise ValueError(f"logprob_start_len must be in [-1, {len(ids)}] for this prompt, got {start!r}")
        return [
            GenerateRequest(
                rid=self.rids[i][k],
                input_ids=ids,
                sampling=p if p.n == 1 else _nth_sample(p, k),
                return_logprob=bool(self.logprob_flags[i]),
                logprob_start_len=start,
                top_logprobs_num=self.tops[i],
                return_text_in_logprobs=call.return_text_in_logprobs,
                return_hidden_states=call.return_hidden_states,
                images=images,
                embed=call.embed,
                stream=call.stream,
            )
            for k in range(p.n)
        ]


def _image_slices(
    processor: ImageProcessor,
    prompts_ids: list[list[int]],
    per_prompt: list[list[tuple[str, Any]]],
    single: bool,
    requests: Callable[[int, list[int], list[ImageInput]], list[GenerateRequest]],
) -> Iterator[list[GenerateRequest]]:
    """Requests in slices of about _SLICE_REQUESTS, each as soon as its prompts' images are preprocessed
    (all images go to a small thread pool at once and come back in order)."""
    processed = processor.process_iter([pair for pairs in per_prompt for pair in pairs])
    part: list[GenerateRequest] = []
    for p, (ids, pairs) in enumerate(zip(prompts_ids, per_prompt)):
        where = "image_data" if single else f"image_data[{p}]"
        new_ids, inputs = expand_placeholders(processor, ids, [next(processed) for _ in pairs], where)
        part += requests(p, new_ids, inputs)
        if len(part) >= _SLICE_REQUESTS:
            yield part
            part = []
    if part:
        yield part


def _token_ids(tokenizer: Any, prompt: Any, input_ids: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt and input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            return [tokenizer(prompt)["input_ids"]], True
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {short_repr(prompt)}")
        return list(tokenizer(list(prompt))["input_ids"]), False
    if isinstance(input_ids, (list, tuple)) and input_ids and _all_ints(input_ids):
        batch, single = [list(input_ids)], True
    elif (
        isinstance(input_ids, (list, tuple))
        and input_ids
        and all(isinstance(row, (list, tuple)) and row and _all_ints(row) for row in input_ids)
    ):
        batch, single = [list(row) for row in input_ids], False
    else:
        raise TypeError(f"input_ids must be a non-empty list[int] or list[list[int]], got {short_repr(input_ids)}")
    for row in batch:
        if min(row) < 0 or max(row) >= vocab_size:
            bad = next(t for t in row if not 0 <= t < vocab_size)
            raise ValueError(f"input_ids holds token id {bad} outside the vocabulary [0, {vocab_size})")
    return batch, single


def _all_ints(row: Union[list, tuple]) -> bool:
    # The types of a row at C speed first: a call of 1,024 prompts of 1,152 ids spent 0.18 s checking
    # each id in Python before the first was sent (the `prefix` benchmark's lead).
    return set(map(type, row)) == {int} or all(_is_int(t) for t in row)


def _per_prompt(name: str, value: Any, count: int, kind: Union[type, tuple[type, ...]]) -> list[Any]:
    """A single value applies to every prompt; a list must have one entry per prompt."""
    if isinstance(value, list) and kind is not list:
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        values = value
    else:
        values = [value] * count
    for v in values:
        if v is not None and not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            what = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"{name} must be a {what} (or a list of them), got {short_repr(v)}")
    return values


def _check_length(ids: list[int], p: SamplingParams, limits: Limits, index: Optional[int], images: bool) -> None:
    where = ("" if index is None else f" (prompt {index})") + (" with its image tokens (image_data)" if images else "")
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
    # Sample 0 keeps the seed itself (so it equals the n=1 output); the rest stay 64-bit ints.
    seed = None if p.seed is None else (p.seed + k * _SEED_STRIDE + (1 << 63)) % (1 << 64) - (1 << 63)
    return msgspec.structs.replace(p, n=1, seed=seed)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
