"""Admission policy alone: waiting order (lpm / fcfs), waiting for a prefix being prefilled, and the
new-token estimate."""

from __future__ import annotations

from collections import deque

import torch

from engine.shared.protocol import GenerateRequest
from engine.shared.sampling import SamplingParams
from scheduler_proc.cache_manager import PrefixMatch
from scheduler_proc.policy import NewTokenEstimate, PrefillingRequests, order_waiting
from scheduler_proc.request import Request


def make(rid: str, ids: list[int], max_new_tokens: int = 10) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Request(GenerateRequest(rid=rid, input_ids=ids, sampling=params), seed=0)


def match_of(lengths: dict[str, int]):
    return lambda req: PrefixMatch(torch.zeros(lengths[req.rid], dtype=torch.int64), None)


def test_lpm_orders_by_longest_match_and_keeps_arrival_order_on_ties():
    waiting = deque(make(rid, [1, 2, 3]) for rid in "abcd")
    order = order_waiting(waiting, "lpm", match_of({"a": 0, "b": 2, "c": 0, "d": 2}))
    assert [r.rid for r, _ in order] == ["b", "d", "a", "c"]
    assert [len(m) for _, m in order] == [2, 2, 0, 0]


def test_fcfs_keeps_arrival_order_and_matches_nothing_yet():
    waiting = deque(make(rid, [1, 2, 3]) for rid in "abc")
    order = order_waiting(waiting, "fcfs", match_of({"a": 0, "b": 2, "c": 1}))
    assert [(r.rid, m) for r, m in order] == [("a", None), ("b", None), ("c", None)]


def test_retracted_requests_go_first_under_lpm():
    waiting = deque([make("resumed", [1, 2, 3]), make("new", [1, 2, 3])])
    waiting[0].retracted = True
    order = order_waiting(waiting, "lpm", match_of({"resumed": 0, "new": 2}))
    assert [r.rid for r, _ in order] == ["resumed", "new"]


def test_waits_for_a_sibling_prefilling_the_same_prompt():
    prompt = list(range(100, 150))
    first, sibling = make("first", prompt), make("sibling", prompt)
    assert PrefillingRequests([first]).worth_waiting_for(sibling, 0)
    assert not PrefillingRequests([first]).worth_waiting_for(sibling, 49)  # already cached
    assert not PrefillingRequests([]).worth_waiting_for(sibling, 0)


def test_does_not_wait_for_a_small_overlap():
    other = make("other", [7, 8] + list(range(200, 260)))
    req = make("req", [7, 8] + list(range(300, 360)))
    assert not PrefillingRequests([other]).worth_waiting_for(req, 0)
    short = make("short", [7, 8, 9])  # for a 3-token prompt, 2 shared tokens are everything cacheable
    assert PrefillingRequests([other]).worth_waiting_for(short, 0)


def test_estimate_decays_and_rises_after_retraction():
    estimate = NewTokenEstimate()
    req = make("r", [1, 2, 3], max_new_tokens=100)
    start = estimate.future_tokens(req)
    assert 0 < start < 100  # less than the worst case
    for _ in range(10_000):
        estimate.step_done()
    low = estimate.future_tokens(req)
    assert 0 < low < start
    req.output_ids = [5] * 60
    estimate.retracted([req])  # it used 60 of 100 already
    assert estimate.ratio >= 0.6
    assert estimate.reserved(req) == req.num_tokens - req.kv_len + estimate.future_tokens(req)


def test_requests_that_end_by_length_alone_reserve_everything():
    estimate = NewTokenEstimate()
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    req = Request(GenerateRequest(rid="r", input_ids=[1, 2, 3], sampling=params), seed=0)
    assert estimate.future_tokens(req) == 100  # its length is known: not an estimate
    req.output_ids = [5] * 30
    assert estimate.future_tokens(req) == 70
    stoppable = SamplingParams(max_new_tokens=100, ignore_eos=True, stop_token_ids=[7])
    other = Request(GenerateRequest(rid="s", input_ids=[1, 2, 3], sampling=stoppable), seed=0)
    assert estimate.future_tokens(other) < 100  # may stop early: the estimate applies
