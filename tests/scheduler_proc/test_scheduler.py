"""The scheduler driven step by step in this process (tiny random model): every KV slot is accounted
for after every step (free, cached, locked by the tree, or owned by one running request), through
retractions and aborts at each stage a request can be in."""

from __future__ import annotations

import gc
import tempfile

import msgspec
import pytest
import zmq
from reference import tiny_model_dir

from engine.shared.args import EngineArgs
from engine.shared.ipc import Endpoints
from engine.shared.protocol import AbortRequest, GenerateBatch, GenerateRequest, TokenBatch
from engine.shared.sampling import SamplingParams
from scheduler_proc.scheduler import Scheduler


class Outputs:
    """Stands in for the detokenizer's socket: collects each request's tokens and finish reason."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.cached: dict[str, int] = {}
        self.extras: dict[str, dict[str, list]] = {}  # logprob lists and hidden-state arrays, concatenated
        self.sends: dict[str, int] = {}  # how many batches carried each request
        self._decoder = msgspec.msgpack.Decoder(TokenBatch)

    def send(self, data: bytes) -> None:
        batch = self._decoder.decode(data)
        for rid, ids, finish, cached, extras in zip(
            batch.rids, batch.new_token_ids, batch.finish, batch.cached_tokens, batch.extras
        ):
            assert rid not in self.finish, f"{rid} got output after it finished"
            self.sends[rid] = self.sends.get(rid, 0) + 1
            self.ids.setdefault(rid, []).extend(ids)
            for name in ("input_token_logprobs", "output_token_logprobs", "hidden_states"):
                values = getattr(extras, name) if extras is not None else None
                self.extras.setdefault(rid, {}).setdefault(name, []).extend(values or [])
            self.cached[rid] = cached
            if finish is not None:
                self.finish[rid] = finish.type


class Driver:
    def __init__(self, model_dir: str, **settings) -> None:
        # Without overlap by default: every step's outputs are read in the turn that launched it.
        settings = {"disable_overlap_schedule": True} | settings
        args = EngineArgs(model_path=model_dir, **settings).resolve()
        # The process-wide context: one per driver, collected with its sockets in one garbage cycle, could
        # block the collector in term() (the sockets' weak references cleared before they were closed).
        self.context = zmq.Context.instance()
        self.scheduler = Scheduler(args, Endpoints.in_dir(tempfile.mkdtemp()), self.context)
        self.out = Outputs()
        self.scheduler.io.to_detokenizer = self.out

    def submit(self, rid: str, ids: list[int], max_new_tokens: int, **options) -> None:
        # A stop id these outputs never reach: the length is a guess for admission, as with real
        # traffic (requests that can only end by length reserve all of it and never retract).
        params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True, stop_token_ids=[49151])
        msg = GenerateRequest(rid=rid, input_ids=ids, sampling=params, **options)
        self.scheduler.handle(GenerateBatch(reqs=[msg]))

    def abort(self, rid: str) -> None:
        self.scheduler.handle(AbortRequest(rids=[rid]))
        self.scheduler.send_outputs()  # as the loop does at the end of the turn that received the abort
        self.check_slots()

    def step(self) -> None:
        s = self.scheduler
        assert s.waiting or s.running or s.in_flight, "the loop would wait for a message"
        s.iterate()
        self.check_slots()

    def run_until(self, done) -> None:
        for _ in range(10_000):
            if done():
                return
            self.step()
        raise AssertionError("the scheduler made no progress")

    def run_all(self) -> None:
        self.run_until(lambda: not self.scheduler.running and not self.scheduler.waiting)

    def request(self, rid: str):
        s = self.scheduler
        return next((r for r in list(s.running) + list(s.waiting) if r.rid == rid), None)

    def check_slots(self) -> None:
        s = self.scheduler
        tree = s.cache.cache
        owned = sum(r.kv_len - r.shared_len for r in s.running)
        assert all(r.row is None and r.kv_len == 0 for r in s.waiting)
        assert s.pool.num_free_slots() + tree.evictable_size() + tree.protected_size() + owned == s.pool.capacity
        if not s.running:
            assert tree.protected_size() == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama", default_model_path)


def prompt(seed: int, length: int) -> list[int]:
    return [100 + (seed * 7919 + i * 104729) % 40000 for i in range(length)]


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_retraction_keeps_every_slot_accounted_and_outputs_whole(model_dir, cache):
    big = Driver(model_dir, max_total_tokens=4096, disable_radix_cache=True)
    small = Driver(model_dir, max_total_tokens=120, chunked_prefill_size=16, disable_radix_cache=not cache)
    for d in (big, small):
        for i in range(8):
            d.submit(f"r{i}", prompt(i % 3, 12), max_new_tokens=40)  # 8 * 52 tokens in a pool of 120
        d.run_all()
    assert small.scheduler.num_retractions > 0
    assert small.out.ids == big.out.ids
    assert all(len(ids) == 40 for ids in small.out.ids.values())
    small.scheduler.flush_cache()
    assert small.scheduler.pool.num_free_slots() == small.scheduler.pool.capacity


@pytest.mark.parametrize(
    "cache,overlap", [(True, False), (False, False), (True, True)], ids=["cache", "no-cache", "cache-overlap"]
)
def test_abort_at_every_stage_frees_its_slots(model_dir, cache, overlap):
    # With overlap, each abort lands while a step holding the request is in flight.
    d = Driver(
        model_dir,
        max_total_tokens=200,
        chunked_prefill_size=8,
        max_running_requests=2,
        disable_radix_cache=not cache,
        disable_overlap_schedule=not overlap,
    )
    s = d.scheduler
    d.submit("decoding", prompt(1, 10), max_new_tokens=150)
    d.submit("prefilling", prompt(2, 40), max_new_tokens=20)
    d.submit("waiting", prompt(3, 10), max_new_tokens=20)  # no request row left for it
    d.run_until(lambda: d.request("prefilling").kv_len >= 16)
    assert d.request("prefilling").prefilling and d.request("waiting") in s.waiting
    d.abort("waiting")
    d.abort("prefilling")  # mid-chunked-prefill, with its first chunks in the cache
    d.run_until(lambda: len(d.out.ids.get("decoding", [])) >= 5)
    d.abort("decoding")
    assert d.out.finish == {"waiting": "abort", "prefilling": "abort", "decoding": "abort"}
    assert d.out.ids.get("prefilling", []) == []
    assert not s.running and not s.waiting
    assert s.pool.num_free_slots() + s.cache.cached_tokens() == s.pool.capacity


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_abort_of_a_retracted_request(model_dir, overlap):
    # With overlap, the victim is retracted while its last token is in flight.
    d = Driver(model_dir, max_total_tokens=100, chunked_prefill_size=16, disable_overlap_schedule=not overlap)
    for i in range(4):
        d.submit(f"r{i}", prompt(i, 10), max_new_tokens=60)
    d.run_until(lambda: any(r.retracted for r in d.scheduler.waiting))
    victim = next(r for r in d.scheduler.waiting if r.retracted)
    generated = list(d.out.ids.get(victim.rid, []))
    assert generated and generated == victim.output_ids  # kept its tokens while it waits
    d.abort(victim.rid)
    d.run_all()
    assert d.out.finish[victim.rid] == "abort" and d.out.ids[victim.rid] == generated
    assert all(len(d.out.ids[f"r{i}"]) == 60 for i in range(4) if f"r{i}" != victim.rid)
    s = d.scheduler
    assert s.pool.num_free_slots() + s.cache.cached_tokens() == s.pool.capacity


def test_samples_of_one_prompt_wait_for_its_prefill_and_share_it(model_dir):
    d = Driver(model_dir, max_total_tokens=1000, chunked_prefill_size=16)
    ids = prompt(5, 50)
    for k in range(4):
        d.submit(f"s{k}", ids, max_new_tokens=4)
    d.run_all()
    assert sorted(d.out.cached.values()) == [0, 49, 49, 49]
    assert len({tuple(v) for v in d.out.ids.values()}) == 1  # greedy: the same continuation


def test_retracted_request_sends_each_logprob_and_hidden_state_once(model_dir):
    options = {"return_logprob": True, "logprob_start_len": 0, "return_hidden_states": True}
    big = Driver(model_dir, max_total_tokens=4096)
    small = Driver(model_dir, max_total_tokens=100, chunked_prefill_size=8)
    for d in (big, small):
        for i in range(4):
            d.submit(f"r{i}", prompt(i, 20), max_new_tokens=40, **options)
        d.run_all()
    assert small.scheduler.num_retractions > 0
    assert small.out.ids == big.out.ids
    for rid, want in big.out.extras.items():
        got = small.out.extras[rid]
        assert len(got["input_token_logprobs"]) == 20 and len(got["output_token_logprobs"]) == 40
        for name in ("input_token_logprobs", "output_token_logprobs"):
            assert [t for _, t in got[name]] == [t for _, t in want[name]]
            assert [lp for lp, _ in got[name][1:]] == pytest.approx([lp for lp, _ in want[name][1:]], abs=1e-4)
        # One [prompt, hidden] array, then one row per decode step (the last token is never run).
        assert [a.shape for a in got["hidden_states"]] == [a.shape for a in want["hidden_states"]]
        assert got["hidden_states"][0].shape[0] == 20 and len(got["hidden_states"]) == 40


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_request_that_does_not_stream_gets_its_whole_output_once_at_its_end(model_dir, overlap):
    driver = Driver(model_dir, max_total_tokens=4096, disable_overlap_schedule=not overlap)
    driver.submit("streamed", prompt(1, 30), 12, return_logprob=True)
    driver.submit("whole", prompt(1, 30), 12, return_logprob=True, stream=False)
    driver.run_all()
    out = driver.out
    assert out.sends["whole"] == 1 and out.sends["streamed"] >= 12
    assert out.ids["whole"] == out.ids["streamed"] and len(out.ids["whole"]) == 12
    whole, streamed = (out.extras[rid]["output_token_logprobs"] for rid in ("whole", "streamed"))
    assert [t for _, t in whole] == [t for _, t in streamed] == out.ids["whole"]  # every step's logprobs kept
    assert [v for v, _ in whole] == pytest.approx([v for v, _ in streamed], abs=1e-4)  # one hit the prefix cache
    assert out.finish["whole"] == "length"


class _StopLoop(Exception):
    pass


def test_the_loop_starts_with_the_start_up_heap_frozen(model_dir):
    # A full collection would otherwise scan the model, the modules and everything else start-up made,
    # ~0.2 s a pause while the device waits: the serving loop begins by moving them out of its view.
    d = Driver(model_dir)
    s = d.scheduler
    in_view = lambda obj: any(o is obj for o in gc.get_objects())  # noqa: E731 (frozen objects are not listed)
    assert in_view(s) and in_view(s.runner)
    s.io.send_ready = lambda info: None  # no frontend here to take it

    def stop() -> None:
        raise _StopLoop

    s.iterate = stop
    try:
        with pytest.raises(_StopLoop):
            s.run_forever()
        assert not in_view(s) and not in_view(s.runner) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the rest of this test process collects as usual


@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap"])
def test_the_decode_fast_path_builds_the_lists_of_the_general_one(model_dir, overlap, monkeypatch):
    from dataclasses import replace

    from scheduler_proc import step

    fast_steps = []

    def both(entries):
        fast, general = step._gather_decode(entries), step._gather_any(entries)
        if fast is not None:
            assert fast.plain and not general.plain
            assert replace(fast, plain=False) == general
            fast_steps.append(len(entries))
        return general

    monkeypatch.setattr(step, "_gather", both)
    d = Driver(model_dir, max_total_tokens=4096, disable_overlap_schedule=not overlap)
    for i in range(5):
        d.submit(f"r{i}", prompt(i, 9 + 5 * i), max_new_tokens=6 + i)
    d.submit("logprobs", prompt(9, 7), max_new_tokens=3, return_logprob=True)  # the general path only
    d.run_all()
    assert len(d.out.ids["r4"]) == 10
    assert max(fast_steps) == 5  # the five plain requests decoding together, once the logprob one ended
