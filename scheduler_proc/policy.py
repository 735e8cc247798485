"""Admission policy: the order in which waiting requests are considered (lpm / fcfs), when one should
wait for a prefix another request is computing, and the estimate of the KV that running requests
will still need.

Reserving every running request's full max_new_tokens would never run out of KV but leaves most of
the pool idle (requests usually stop early). Instead, as in SGLang, a request is expected to still
generate `ratio` of its remaining max_new_tokens; the ratio starts high, decays while steps go by
without trouble, and is raised again when the pool runs short and requests are retracted.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Optional

from scheduler_proc.cache_manager import PrefixMatch
from scheduler_proc.radix_cache import common_prefix_len
from scheduler_proc.request import Request

_LPM_MAX_QUEUE = 128  # longer queues are taken fcfs: matching each waiting request every step costs too much
_SHARED_PREFIX_MIN = 32  # tokens another request's prefill must add to this one's cache hit to wait for it
_INIT_RATIO, _MIN_RATIO, _DECAY_STEPS = 0.7, 0.1, 600  # SGLang's defaults (schedule_conservativeness=1)
_RETRACT_DECODE_STEPS = 20  # after a retraction, expect every running request to decode this many more tokens
_CLIP_MAX_NEW_TOKENS = 4096  # a huge max_new_tokens alone must not block admission


def order_waiting(
    waiting: deque[Request], policy: str, match: Callable[[Request], PrefixMatch]
) -> list[tuple[Request, Optional[PrefixMatch]]]:
    """Waiting requests in the order admission tries them, with their prefix matches where computed.

    fcfs: arrival order. lpm: longest cached prefix first, so that requests sharing a prefix run
    while it is cached. Either way retracted requests (which keep their place at the front) go first."""
    if policy == "fcfs" or len(waiting) > _LPM_MAX_QUEUE:
        return [(req, None) for req in waiting]
    matched = [(req, match(req)) for req in waiting]
    matched.sort(key=lambda item: (not item[0].retracted, -len(item[1])))  # stable: ties stay fcfs
    return matched


def retraction_order(req: Request) -> tuple[int, int]:
    """Which running request retracts first (the smallest): fewest generated tokens; among those, the most KV held."""
    return (len(req.output_ids), -req.num_tokens)


class PrefillingRequests:
    """The running requests still prefilling, by their first cache key: a waiting request can share a
    prefix only with those starting as it does, so deciding whether it waits looks at few of them (the
    `prefix` workload's admissions compared each waiting request with every prefilling one)."""

    def __init__(self, reqs: Iterable[Request] = ()) -> None:
        self._by_first: dict[int, list[Request]] = {}
        for req in reqs:
            self.add(req)

    def add(self, req: Request) -> None:
        if req.num_tokens:
            self._by_first.setdefault(req.cache_tokens(0, 1)[0], []).append(req)

    def worth_waiting_for(self, req: Request, matched: int) -> bool:
        """Whether req should stay queued because a request now prefilling computes a longer prefix of
        it than the cache holds: one step later that prefix is in the tree and req reuses it (the n > 1
        samples of one prompt, requests arriving together with a shared system prompt)."""
        limit = req.max_prefix_len()
        if limit <= matched:
            return False
        ids = req.cache_tokens(0, limit)  # as the cache keys them: two images of one size share no prefix
        for other in self._by_first.get(ids[0], ()):
            if other.cache_tokens(matched, matched + 1) != ids[matched : matched + 1]:
                continue  # it adds nothing past the cached prefix: no copy of its tokens to find that out
            gain = common_prefix_len(other.cache_tokens(0, other.num_tokens), ids) - matched
            if gain > 0 and gain >= min(_SHARED_PREFIX_MIN, limit - matched):
                return True
        return False


class NewTokenEstimate:
    """The share of its remaining max_new_tokens that a running request is expected to still need."""

    def __init__(self) -> None:
        self.ratio = _INIT_RATIO

    def future_tokens(self, req: Request) -> int:
        """KV slots req is expected to still take for tokens it has not generated yet. A request that
        can only end by length (ignore_eos, no stop ids or strings) is no guess: all of it is counted,
        so workloads of such requests are admitted as far as they fit and never retracted."""
        remaining = min(req.sampling.max_new_tokens - req.num_generated, _CLIP_MAX_NEW_TOKENS)
        params = req.sampling
        certain = params.ignore_eos and not params.stop and not params.stop_token_ids
        return math.ceil(max(remaining, 0) * (1.0 if certain else self.ratio))

    def reserved(self, req: Request) -> int:
        """Slots a running request is expected to still take: the rest of its prefill plus its future."""
        return max(0, req.total_tokens - req.kv_len) + self.future_tokens(req)

    def step_done(self) -> None:
        self.ratio = max(_MIN_RATIO, self.ratio - (_INIT_RATIO - _MIN_RATIO) / _DECAY_STEPS)

    def idle(self) -> None:
        self.ratio = _INIT_RATIO

    def retracted(self, running: list[Request]) -> None:
        """The pool ran short, so the estimate was low: raise it to at least what the requests
        still running used so far plus some more steps each (SGLang's re-estimate)."""
        decoded = sum(len(r.output_ids) for r in running)
        budget = sum(r.sampling.max_new_tokens for r in running)
        if budget > 0:
            used = (decoded + _RETRACT_DECODE_STEPS * len(running)) / budget
            self.ratio = min(1.0, max(self.ratio, used))
