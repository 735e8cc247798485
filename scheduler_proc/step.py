"""One scheduler step: the ForwardBatch and the SamplingBatch built from (request, new token count)
entries, and where each entry's rows sit in them (read back by step_outputs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from scheduler_proc.forward_batch import ForwardBatch, to_device_int64
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.request import Request
from scheduler_proc.sampler import SamplingBatch


@dataclass
class Step:
    """A built step: its entries, its device inputs, and each entry's place in them."""

    entries: list[tuple[Request, int]]
    batch: ForwardBatch
    sampling: Optional[SamplingBatch]
    keep_hidden: bool  # some entry returns hidden states: they must outlive the step
    sample_entries: list[int]  # entries that sample a token, in sampling-row order
    logit_spans: list[tuple[int, int]]  # per entry: (first logit row, number of rows)
    input_logprob_starts: list[Optional[int]]  # per entry: first prompt position scored, if any
    starts: list[int]  # per entry: its KV length before this step
    pending_inputs: list[tuple[int, Request]]  # (row of input_ids, request) whose input is its pending token
    plain: bool = False  # every entry decodes one token and samples the next, owing nothing per position


def build_step(entries: list[tuple[Request, int]], pool: KVPool, eos_ids: list[int]) -> Step:
    """The batch of one step. An entry may start at a token the step in flight is still sampling
    (req.pending): its input id is filled on the device from that step's output (in_flight.py)."""
    h = _gather(entries)
    uploaded = to_device_int64(
        h.input_ids,
        h.positions,
        h.token_rows,
        h.req_rows,
        h.logit_rows,
        h.sample_req_rows,
        h.sample_positions,
        h.sample_rows,
        device=pool.device,
    )
    input_ids, positions, token_rows, req_rows, logit_rows, sample_req_rows, sample_positions, index = uploaded
    out_cache_loc = pool.alloc_slots(len(h.input_ids))
    pool.set_tokens(token_rows, positions, out_cache_loc)
    batch = ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_cache_loc=out_cache_loc,
        req_pool_indices=req_rows,
        prefix_lens_cpu=h.starts,
        extend_lens_cpu=h.extend_lens,
        logit_rows=logit_rows,
        is_decode=len(h.input_ids) == len(entries),  # every entry adds one token
    )
    if h.has_images:
        attach_images(batch, entries)
    sampling = _sampling_batch(entries, h.sample_entries, eos_ids, sample_req_rows, sample_positions, index)
    return Step(
        entries,
        batch,
        sampling,
        h.keep_hidden,
        h.sample_entries,
        h.logit_spans,
        h.input_starts,
        h.starts,
        h.pending,
        h.plain,
    )


@dataclass
class _HostLists:
    """A step's host lists: per token, per logit row, per entry, per sampled entry."""

    input_ids: list[int]
    positions: list[int]
    token_rows: list[int]  # each token's request row
    logit_rows: list[int]
    starts: list[int]  # per entry: its KV length before the step
    req_rows: list[int]
    extend_lens: list[int]
    logit_spans: list[tuple[int, int]]
    input_starts: list[Optional[int]]
    pending: list[tuple[int, Request]]  # (token row, request) whose input is its pending token
    sample_entries: list[int]
    sample_rows: list[int]  # their logit rows
    sample_req_rows: list[int]
    sample_positions: list[int]  # the RNG counter: req.total_tokens
    keep_hidden: bool
    has_images: bool
    plain: bool = False  # built by _gather_decode


def _gather(entries: list[tuple[Request, int]]) -> _HostLists:
    return _gather_decode(entries) or _gather_any(entries)


def _gather_any(entries: list[tuple[Request, int]]) -> _HostLists:
    """One pass over the entries (every running request, every step), reading request fields directly."""
    input_ids: list[int] = []
    positions: list[int] = []
    token_rows: list[int] = []
    logit_rows: list[int] = []
    starts, req_rows, extend_lens, spans, input_starts, pending = [], [], [], [], [], []
    sample_entries, sample_rows, sample_req_rows, sample_positions = [], [], [], []
    keep_hidden = has_images = False
    for i, (req, n) in enumerate(entries):
        start, t0, row, msg = req.kv_len, len(input_ids), req.row, req.msg
        starts.append(start)
        req_rows.append(row)
        extend_lens.append(n)
        num_tokens = len(req.input_ids) + len(req.output_ids)
        if start == num_tokens:  # decoding the pending token
            pending.append((t0, req))
            input_ids.append(0)
        else:
            input_ids += req.tokens(start, start + n)
        if n == 1:
            positions.append(start)
            token_rows.append(row)
        else:
            positions += range(start, start + n)
            token_rows += [row] * n
        first_row = len(logit_rows)
        span = _input_logprob_span(req, start, n) if msg.return_logprob else None
        if span:
            logit_rows += range(t0 + span[0] - start, t0 + span[1] - start)
        if start + n == num_tokens + req.pending and req.sampling.max_new_tokens > 0:  # reaches its next token
            sample_rows.append(len(logit_rows))
            logit_rows.append(t0 + n - 1)
            sample_entries.append(i)
            sample_req_rows.append(row)
            sample_positions.append(num_tokens + req.pending)
        spans.append((first_row, len(logit_rows) - first_row))
        input_starts.append(span[0] if span else None)
        keep_hidden = keep_hidden or msg.return_hidden_states or msg.embed
        has_images = has_images or req.images is not None
    return _HostLists(
        input_ids, positions, token_rows, logit_rows, starts, req_rows, extend_lens, spans, input_starts, pending,
        sample_entries, sample_rows, sample_req_rows, sample_positions, keep_hidden, has_images,
    )  # fmt: skip


def _gather_decode(entries: list[tuple[Request, int]]) -> Optional[_HostLists]:
    """The lists of a step in which every entry decodes one token and samples the next, asking for
    nothing per position (logprobs, hidden states, images): a column per field instead of _gather_any's
    branches per entry (at batch 1,024 its host time was the larger part of scheduling a step).
    None when some entry is otherwise."""
    reqs = [req for req, n in entries if n == 1 and req.plain]
    if len(reqs) < len(entries):
        return None
    starts = [req.kv_len for req in reqs]
    rows = [req.row for req in reqs]
    lengths = [len(req.input_ids) + len(req.output_ids) for req in reqs]
    sample_positions = [n + req.pending for req, n in zip(reqs, lengths)]  # the RNG counter: req.total_tokens
    if any(start + 1 != position for start, position in zip(starts, sample_positions)):
        return None  # some entry does not reach its next token with this step
    if starts == lengths:  # overlap: every one decodes its pending token, filled on the device
        input_ids = [0] * len(reqs)
        pending = list(enumerate(reqs))
    else:
        input_ids = [
            req.tokens(start, start + 1)[0] if start < n else 0 for req, start, n in zip(reqs, starts, lengths)
        ]
        pending = [(i, req) for i, (req, start, n) in enumerate(zip(reqs, starts, lengths)) if start == n]
    index = list(range(len(reqs)))
    return _HostLists(
        input_ids, starts, rows, index, starts, rows, [1] * len(reqs), [(i, 1) for i in index], [None] * len(reqs),
        pending, index, index, rows, sample_positions, False, False, True,
    )  # fmt: skip


def _input_logprob_span(req: Request, start: int, n: int) -> Optional[tuple[int, int]]:
    """Positions [first, last) of this chunk whose logits score prompt token q+1, when input logprobs are asked."""
    msg = req.msg
    if not msg.return_logprob or msg.logprob_start_len < 0 or start >= len(req.input_ids):
        return None
    # Positions below replay_until were scored before a retraction: their logprobs went out then.
    first = max(start, req.replay_until, max(msg.logprob_start_len, 1) - 1)
    last = min(start + n, len(req.input_ids) - 1)  # position L-1 predicts the first output token
    return (first, last) if first < last else None


def _sampling_batch(
    entries: list[tuple[Request, int]],
    sample_entries: list[int],
    eos_ids: list[int],
    rows: torch.Tensor,
    positions: torch.Tensor,
    logit_index: torch.Tensor,
) -> Optional[SamplingBatch]:
    if not sample_entries:
        return None
    bias, banned = [], []
    all_greedy, any_penalty, any_filter = True, False, False
    for s, i in enumerate(sample_entries):  # one pass: this runs every step for every sampling request
        req = entries[i][0]
        params = req.sampling
        all_greedy = all_greedy and params.is_greedy
        any_penalty = any_penalty or params.uses_penalties
        any_filter = any_filter or params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0
        if params.logit_bias:
            bias += [(s, token, value) for token, value in params.logit_bias.items()]
        if params.min_new_tokens and req.num_generated < params.min_new_tokens:
            held = list(params.stop_token_ids) + ([] if params.ignore_eos else eos_ids)
            banned += [(s, token) for token in held]
    return SamplingBatch(
        rows=rows,
        positions=positions,
        logit_index=logit_index,
        all_greedy=all_greedy,
        any_penalty=any_penalty,
        any_filter=any_filter,
        bias=bias,
        banned=banned,
    )


def attach_images(batch: ForwardBatch, entries: list[tuple[Request, int]]) -> None:
    """Set the step's rope positions and image parts when a request in it has images: [T] (KV position
    + each request's shift) when no image token is in the step, else [3, T]."""
    if all(req.images is None for req, _ in entries):
        return
    if not any(req.images is not None and req.images.needs_3d(req.kv_len, req.kv_len + n) for req, n in entries):
        shifts = [req.images.shift(req.kv_len) if req.images is not None else 0 for req, _ in entries]
        if any(shifts):
            shift = torch.tensor(shifts, dtype=torch.int64)
            if not batch.is_decode:
                shift = shift.repeat_interleave(torch.tensor(batch.extend_lens_cpu))
            batch.rope_positions = batch.positions + shift.to(batch.positions.device, non_blocking=True)
        return
    pieces, parts, row = [], [], 0
    for req, n in entries:
        start, end = req.kv_len, req.kv_len + n
        if req.images is None:
            pieces.append(np.broadcast_to(np.arange(start, end, dtype=np.int64), (3, n)))
        else:
            pieces.append(req.images.rope_positions(start, end))
            parts += req.images.parts(start, end, row)
        row += n
    batch.rope_positions = torch.from_numpy(np.concatenate(pieces, axis=1)).to(batch.positions.device)
    batch.image_parts = parts
