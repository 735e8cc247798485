"""Grammars in the scheduler, driven step by step in this process (tiny random model, the default tokenizer):
compiling happens off the step loop and once per text, the token mask allows exactly what the grammar does,
the sampler keeps the grammar's choice when bias or min_new_tokens would leave a row nothing, and a
constrained request's output is the same through retractions, chunked prefill and overlap."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from test_scheduler import Driver, prompt

from engine.shared.protocol import AbortRequest, GenerateBatch, GenerateRequest
from engine.shared.sampling import SamplingParams
from scheduler_proc.grammar import GrammarQueue
from scheduler_proc.grammar_mask import StepMask, TokenMasks, apply_token_mask
from scheduler_proc.request import Request
from scheduler_proc.sampler import SamplingBatch, SamplingState

YES_NO = 'root ::= "yes" | "no"'
# Bounded, so that a random model's outputs end by the grammar; the words force multi-token paths.
REGEXES = [
    r"(alpha|beta|gamma)-[0-9]{2,4}",
    r"\[(true|false)(, (true|false)){1,3}\]",
    r"[a-z]{3,6}@[a-z]{2,5}\.(com|org)",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path):
    from reference import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama", default_model_path)


def submit(driver: Driver, rid: str, ids: list[int], **params) -> None:
    sampling = SamplingParams(**({"temperature": 0, "max_new_tokens": 40} | params))
    driver.scheduler.handle(GenerateBatch(reqs=[GenerateRequest(rid=rid, input_ids=ids, sampling=sampling)]))


def turn_until(driver: Driver, done) -> None:
    """Loop turns, as run_forever does (an idle turn waits for a compile at most a poll period)."""
    for _ in range(20_000):
        if done():
            return
        driver.scheduler.iterate()
        driver.check_slots()
    raise AssertionError("the scheduler made no progress")


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_compiling_never_holds_up_other_requests(model_dir, tokenizer, monkeypatch):
    release, started = threading.Event(), threading.Event()
    threads = []
    original = GrammarQueue._compile

    def slow_compile(self, key):  # as a grammar that takes long to compile
        threads.append(threading.current_thread())
        started.set()
        assert release.wait(60)
        return original(self, key)

    monkeypatch.setattr(GrammarQueue, "_compile", slow_compile)
    d = Driver(model_dir, max_total_tokens=1000, disable_overlap_schedule=False)
    s = d.scheduler
    submit(d, "constrained", prompt(1, 8), regex=REGEXES[0])
    submit(d, "free", prompt(2, 8), max_new_tokens=12)
    submit(d, "same-grammar", prompt(3, 8), regex=REGEXES[0])
    turn_until(d, lambda: "free" in d.out.finish)
    assert len(d.out.ids["free"]) == 12
    assert "constrained" not in d.out.ids and len(s.grammars) == 2  # both wait for the one compile
    assert started.wait(30)  # the worker thread may start after a short request is done: wait for it
    assert threads[0] is not threading.main_thread()
    assert s.server_info()["num_waiting"] == 2
    release.set()
    turn_until(d, lambda: {"constrained", "same-grammar"} <= set(d.out.finish))
    for rid in ("constrained", "same-grammar"):
        assert d.out.finish[rid] == "stop"
        assert re.fullmatch(REGEXES[0], text(tokenizer, d.out.ids[rid]))
    assert s.grammars.num_compiled == 1 and len(threads) == 1


def test_a_failed_compile_or_an_abort_ends_that_request_alone(model_dir, monkeypatch):
    def failing_compile(self, key):
        raise RuntimeError("[12:00:00] /project/cpp/grammar.cc:12: something xgrammar could not do")

    d = Driver(model_dir, max_total_tokens=1000)
    submit(d, "aborted", prompt(1, 8), ebnf=YES_NO)
    d.scheduler.handle(AbortRequest(rids=["aborted"]))
    monkeypatch.setattr(GrammarQueue, "_compile", failing_compile)
    submit(d, "bad", prompt(2, 8), regex="x+")
    submit(d, "free", prompt(3, 8), max_new_tokens=5)
    turn_until(d, lambda: {"bad", "free", "aborted"} <= set(d.out.finish))
    assert d.out.finish == {"aborted": "abort", "bad": "abort", "free": "length"}
    assert len(d.out.ids["free"]) == 5 and not d.out.ids.get("bad")
    assert not d.scheduler.grammars.compiling


# Exact lengths near max_new_tokens: admission expects less, so a small pool runs short and retracts.
LONG_REGEXES = [r"[0-9]{40}", r"[1-9]{36}(0|5)", r"[0-4]{36}-[5-9]{2}"]


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_constrained_outputs_survive_retraction_and_chunked_prefill(model_dir, tokenizer, overlap):
    big = Driver(model_dir, max_total_tokens=4096, disable_overlap_schedule=not overlap)
    small = Driver(model_dir, max_total_tokens=100, chunked_prefill_size=8, disable_overlap_schedule=not overlap)
    for d in (big, small):
        for i in range(8):
            sampled = {"temperature": 1.0, "seed": i} if i % 2 else {}
            submit(d, f"c{i}", prompt(i, 4), regex=LONG_REGEXES[i % 3], max_new_tokens=44, **sampled)
        submit(d, "free", prompt(9, 4), max_new_tokens=30, temperature=1.0, seed=9)
        turn_until(d, lambda d=d: len(d.out.finish) == 9)
    assert small.scheduler.num_retractions > 0  # of constrained requests: the free one is never the least advanced
    assert small.out.ids == big.out.ids
    for i in range(8):
        assert small.out.finish[f"c{i}"] == "stop"
        assert re.fullmatch(LONG_REGEXES[i % 3], text(tokenizer, small.out.ids[f"c{i}"]))


def test_with_overlap_masks_are_filled_ahead_on_the_worker_thread(model_dir, monkeypatch):
    # A constrained step's mask is filled while the scheduler's thread sends outputs and schedules (it was
    # on the path between two device steps); the outputs are those of the plain loop, which fills in place.
    threads: list[str] = []
    original = TokenMasks._fill_rows

    def recording(self, reqs, live, host, started=None):
        threads.append(threading.current_thread().name)
        return original(self, reqs, live, host, started)

    monkeypatch.setattr(TokenMasks, "_fill_rows", recording)
    outputs = []
    for overlap in (False, True):
        d = Driver(model_dir, max_total_tokens=1000, disable_overlap_schedule=not overlap)
        for i in range(3):
            submit(d, f"c{i}", prompt(i, 6), regex=LONG_REGEXES[i], max_new_tokens=44, temperature=1.0, seed=i)
        submit(d, "free", prompt(5, 6), max_new_tokens=30)
        turn_until(d, lambda d=d: len(d.out.finish) == 4)
        outputs.append(d.out.ids)
        on_worker = sum(name.startswith("token-masks") for name in threads)
        on_main = len(threads) - on_worker
        if overlap:  # all, or all but the first step's if no step was read before it
            assert on_worker >= 30 and on_main <= 1
        else:
            assert on_worker == 0 and on_main >= 30
        threads.clear()
    assert outputs[0] == outputs[1]


def test_fill_ahead_returns_once_the_worker_is_inside_xgrammar(tokenizer, monkeypatch):
    # The scheduler's thread runs Python without blocking after fill_ahead: a worker still waiting for the GIL
    # then would start only at the join, and the fill would not overlap anything.
    reqs = [compiled_request(tokenizer, YES_NO, f"r{i}") for i in range(4)]
    masks = TokenMasks(4, 49152, torch.device("cpu"))
    entered, release = threading.Event(), threading.Event()

    class SlowBatch:  # xgrammar's batch fill, held until the test lets it go (waiting releases the GIL)
        def batch_fill_next_token_bitmask(self, matchers, host, live):
            entered.set()
            release.wait(timeout=10)
            real.batch_fill_next_token_bitmask(matchers, host, live)

    masks.fill_ahead(reqs)  # the first starts the worker thread (its start alone hands the GIL over)
    masks.fill(reqs)
    real, masks._batch = masks._batch, SlowBatch()
    masks.fill_ahead(reqs)
    for _ in range(20_000):  # ~1 ms of Python on this thread, as the scheduler's turn runs after it
        pass
    assert entered.is_set()
    release.set()
    alone = TokenMasks(4, 49152, torch.device("cpu"))
    assert torch.equal(masks.fill(reqs).bits, alone.fill(reqs).bits)


def test_a_row_freed_under_a_step_yet_to_sample_waits_for_that_sampling(model_dir):
    # With overlap, a constrained step samples after the next step is scheduled (its forward runs
    # meanwhile). A request that ended before that sampling frees its row; a request admitted in that
    # schedule must not take the row, or the sampling's token count lands in the newcomer's penalties.
    d = Driver(model_dir, max_total_tokens=1000, disable_overlap_schedule=False)
    s = d.scheduler
    submit(d, "constrained", prompt(1, 8), regex=r"[0-9]{6}", max_new_tokens=20)
    turn_until(d, lambda: "constrained" in d.out.finish)
    assert s.in_flight is not None and s.in_flight.awaiting_sample  # its last step, yet to sample
    freed = s.in_flight.rows_to_withhold()
    submit(d, "penalized", prompt(2, 8), max_new_tokens=4, frequency_penalty=1.0)
    s.iterate()  # admits "penalized" and launches its prefill, which samples one token
    newcomer = d.request("penalized")
    assert newcomer.row not in freed
    assert int(s.runner.sampling._output_counts[newcomer.row].sum()) == 1
    turn_until(d, lambda: "penalized" in d.out.finish)
    d.check_slots()


def test_a_failed_sampling_fails_its_step_and_the_next_one_is_not_launched(model_dir, monkeypatch):
    # The step in flight fails its requests; the step scheduled before it sampled is given back unlaunched,
    # and a request admitted there (not in the failed step) runs as it would alone.
    alone = Driver(model_dir, max_total_tokens=1000, disable_overlap_schedule=False)
    submit(alone, "late", prompt(3, 8), max_new_tokens=16)
    turn_until(alone, lambda: "late" in alone.out.finish)

    d = Driver(model_dir, max_total_tokens=1000, disable_overlap_schedule=False)
    submit(d, "constrained", prompt(1, 8), regex=r"[0-9]{12}", max_new_tokens=20)
    turn_until(d, lambda: d.out.ids.get("constrained"))  # compiled (however long that took) and decoding
    submit(d, "free", prompt(2, 8), max_new_tokens=30)
    turn_until(d, lambda: len(d.out.ids.get("free", [])) >= 2)  # both decode in every step from here
    original, calls = TokenMasks.fill, []

    def fail_once(self, reqs):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return original(self, reqs)

    monkeypatch.setattr(TokenMasks, "fill", fail_once)
    submit(d, "late", prompt(3, 8), max_new_tokens=16)
    turn_until(d, lambda: len(d.out.finish) == 3)  # checks every slot, every turn
    assert d.out.finish == {"free": "abort", "constrained": "abort", "late": "length"}
    assert d.out.ids["late"] == alone.out.ids["late"]


def compiled_request(tokenizer, grammar: str, rid: str = "r") -> Request:
    queue = GrammarQueue(tokenizer, 49152, [tokenizer.eos_token_id], _args())
    req = Request(GenerateRequest(rid=rid, input_ids=[1], sampling=SamplingParams(ebnf=grammar)), seed=0)
    queue.add(req)
    queue.compiling[0][1].result(timeout=60)
    assert queue.ready() == [(req, None)]
    return req


def _args():
    from engine.shared.args import EngineArgs

    return EngineArgs()


def test_the_mask_allows_exactly_what_the_grammar_does(tokenizer):
    constrained = compiled_request(tokenizer, YES_NO)
    free = Request(GenerateRequest(rid="free", input_ids=[1], sampling=SamplingParams()), seed=0)
    ended = compiled_request(tokenizer, YES_NO, "ended")
    ended.finish = object()  # its token is dropped: its row stays open
    masks = TokenMasks(4, 49152, torch.device("cpu"))
    logits = torch.zeros(3, 49152)
    apply_token_mask(logits, masks.fill([constrained, free, ended]))
    allowed = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    prefixes = {i for i, t in enumerate(vocab) if t and ("yes".startswith(t) or "no".startswith(t))}
    assert allowed == prefixes and {tokenizer.convert_tokens_to_ids("yes")} <= allowed
    assert torch.isfinite(logits[1:]).all()
    for token in tokenizer.encode("yes"):
        assert constrained.grammar.accept_token(token)
    logits = torch.zeros(1, 49152)
    apply_token_mask(logits, masks.fill([constrained]))  # "yes" is complete: only the end token may follow
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    logits = torch.zeros(2, 49152)  # row 0 held a grammar's mask last step: a free request's row now
    apply_token_mask(logits, masks.fill([free, constrained]))
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[1]).sum() == 1


def test_padding_ids_of_the_model_are_forbidden_to_constrained_rows_only(tokenizer):
    queue = GrammarQueue(tokenizer, 49152 + 96, [tokenizer.eos_token_id], _args())  # logits wider than the vocab
    assert queue.token_vocab == 49152
    constrained = compiled_request(tokenizer, YES_NO)
    free = Request(GenerateRequest(rid="free", input_ids=[1], sampling=SamplingParams()), seed=0)
    logits = torch.zeros(2, 49152 + 96)
    apply_token_mask(logits, TokenMasks(2, queue.token_vocab, torch.device("cpu")).fill([constrained, free]))
    assert torch.isneginf(logits[0, 49152:]).all() and torch.isfinite(logits[0, :49152]).sum() > 0
    assert torch.isfinite(logits[1]).all()
    other = compiled_request(tokenizer, YES_NO, "other")
    logits = torch.zeros(2, 49152 + 96)  # every row constrained: the padding is filled without an index
    apply_token_mask(logits, TokenMasks(2, queue.token_vocab, torch.device("cpu")).fill([constrained, other]))
    assert torch.isneginf(logits[:, 49152:]).all() and (torch.isfinite(logits[:, :49152]).sum(dim=1) > 0).all()


def test_matchers_advance_in_one_batch_as_one_by_one(tokenizer):
    queue = GrammarQueue(tokenizer, 49152, [tokenizer.eos_token_id], _args())
    reqs = []
    for i in range(100):
        req = Request(GenerateRequest(rid=str(i), input_ids=[1], sampling=SamplingParams(regex=REGEXES[i % 3])), 0)
        queue.add(req)
        reqs.append(req)
    for _, future in queue.compiling:
        future.result(timeout=60)
    assert len(queue.ready()) == 100
    words = ["alpha-12", "[true, false]", "abc@de.org"]
    paths = [tokenizer.encode(words[i % 3]) for i in range(100)]
    masks = TokenMasks(100, queue.token_vocab, torch.device("cpu"))
    for step in range(max(map(len, paths))):
        pairs = [(req, path[step]) for req, path in zip(reqs, paths) if step < len(path)]
        if step == 0:  # refused: that request alone gets an error
            pairs[8] = (reqs[8], tokenizer.encode("~")[0])
        masks.accept(pairs)
    assert [i for i, req in enumerate(reqs) if req.error] == [8] and "sampling_params.regex" in reqs[8].error
    for i, req in enumerate(reqs):
        alone = Request(GenerateRequest(rid="a", input_ids=[1], sampling=SamplingParams(regex=REGEXES[i % 3])), 0)
        queue.add(alone)
        queue.compiling[-1][1].result(timeout=60)
        queue.ready()
        for token in paths[i]:
            assert alone.grammar.accept_token(token)
        if i != 8:  # the same state: the same mask next
            assert torch.equal(masks.fill([req]).bits, TokenMasks(1, 49152, torch.device("cpu")).fill([alone]).bits)


def test_the_grammar_wins_when_bias_and_min_new_tokens_leave_a_row_nothing():
    state = SamplingState(2, 64, torch.device("cpu"))
    for row in range(2):
        state.admit(row, SamplingParams(temperature=0.7), seed=row, prompt_ids=[0])
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[:, 0] = (1 << 3) | (1 << 5)  # tokens 3 and 5 allowed
    mask = StepMask(bits, 64, torch.tensor([True, True]))
    logits = torch.zeros(2, 64)  # tokens 3 and 5 equally likely
    apply_token_mask(logits, mask)
    seen = set()
    for position in range(40):
        batch = SamplingBatch(
            rows=torch.tensor([0, 1]),
            positions=torch.tensor([position, position]),
            logit_index=torch.arange(2),
            all_greedy=False,
            any_penalty=False,
            bias=[(0, 3, float("-inf"))],  # row 0: one allowed token left
            banned=[(1, 3), (1, 5)],  # row 1: none left, as min_new_tokens holding back the end token
            grammar_mask=mask,
        )
        ids = state.sample(logits.clone(), batch)
        assert int(ids[0]) == 5
        seen.add(int(ids[1]))
    assert seen == {3, 5}  # the grammar's distribution, as if nothing were banned
