"""Reading a step's outputs back onto its requests: the sampled token of each entry, the logprobs and
the hidden states it asked for (sent with its next TokenBatch)."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from scheduler_proc.pooling import Pooler
from scheduler_proc.request import Request
from scheduler_proc.step import Step

logger = logging.getLogger(__name__)


def read_step_outputs(
    step: Step, hidden: torch.Tensor, logits: torch.Tensor, sampled: list[int], pooler: Optional[Pooler] = None
) -> list:
    """Record logprobs, hidden states and embeddings on the requests; returns the new token per entry (or
    None). A request that finished while the step ran (aborted, or ended by the step before) gets nothing."""
    if step.plain:  # entry i samples row i, and nothing else is owed
        return list(sampled)
    next_ids: list[Optional[int]] = [None] * len(step.entries)
    for i, token in zip(step.sample_entries, sampled):
        next_ids[i] = token
    wants = any(r.msg.return_logprob for r, _ in step.entries)
    logprobs = torch.log_softmax(logits.float(), dim=-1) if wants else None
    t0 = 0
    for i, (req, n) in enumerate(step.entries):
        if req.finish is not None:
            t0 += n
            continue
        try:
            if req.msg.return_logprob and logprobs is not None:
                _record_logprobs(req, step, i, logprobs, next_ids[i])
            start = step.starts[i]
            skip = max(0, req.replay_until - start)  # rows recomputed after a retraction went out before
            if req.msg.return_hidden_states and skip < n:
                rows = hidden[t0 + skip : t0 + n].float().cpu().numpy()
                prompt_len = len(req.input_ids)
                req.add_hidden(rows, prompt=start + skip < prompt_len, prompt_done=start + n >= prompt_len)
            if req.msg.embed and pooler is not None and skip < n:
                pooler.add(req, hidden[t0 + skip : t0 + n], start + skip)
        except Exception as exc:  # one request's extras failing ends that request (at its finish check) alone
            logger.exception("recording the outputs of request %s failed", req.rid)
            req.error = f"{type(exc).__name__}: {exc}"
        t0 += n
    return next_ids


def _record_logprobs(req: Request, step: Step, i: int, logprobs: torch.Tensor, token: Optional[int]) -> None:
    first_row, count = step.logit_spans[i]
    top_n = req.msg.top_logprobs_num
    extras = req.pending_extras()
    first_q = step.input_logprob_starts[i]
    if first_q is not None:
        num_input = count - (1 if token is not None else 0)
        rows = logprobs[first_row : first_row + num_input]
        targets = req.input_ids[first_q + 1 : first_q + 1 + num_input]
        chosen = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
        entries: list = [(lp, t) for lp, t in zip(chosen, targets)]
        if first_q == 0 and req.msg.logprob_start_len == 0:
            entries.insert(0, (None, req.input_ids[0]))
        extras.input_token_logprobs = (extras.input_token_logprobs or []) + entries
        if top_n > 0:
            tops = _top(rows, top_n)
            if first_q == 0 and req.msg.logprob_start_len == 0:
                tops.insert(0, [])
            extras.input_top_logprobs = (extras.input_top_logprobs or []) + tops
    if token is not None:
        row = logprobs[first_row + count - 1]
        extras.output_token_logprobs = (extras.output_token_logprobs or []) + [(row[token].item(), token)]
        if top_n > 0:
            extras.output_top_logprobs = (extras.output_top_logprobs or []) + _top(row[None], top_n)


def _top(rows: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
    values, ids = rows.topk(min(k, rows.shape[-1]), dim=-1)
    # A constrained row may allow fewer than k tokens: the forbidden ones (-inf) are no candidates.
    return [[(v, t) for v, t in zip(vs, ts) if v != -math.inf] for vs, ts in zip(values.tolist(), ids.tolist())]
