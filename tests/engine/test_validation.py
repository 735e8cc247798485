"""Every mistake raises in the caller (sync and async alike) naming the field, and the engine serves
the next request; a failure inside the scheduler ends only the request it belongs to; abort by rid."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from reference import assert_pool_free

from engine import Engine

OK = {"temperature": 0, "max_new_tokens": 2}
LONG_PROMPT = "word " * 8000  # about 8000 tokens: with max_new_tokens it passes the 8192 context


def gen(**kwargs):
    return dict(prompt="Hello", sampling_params=OK) | kwargs


def sp(**params):
    return gen(sampling_params=OK | params)


# (id, "generate" or "chat", kwargs, exception type, words the message must hold)
CASES = [
    ("params-not-dict", "generate", gen(sampling_params="greedy"), TypeError, ["sampling_params"]),
    ("unknown-key", "generate", sp(temprature=0.5), ValueError, ["temprature", "temperature", "top_p"]),
    ("temperature-negative", "generate", sp(temperature=-0.1), ValueError, ["temperature", "-0.1"]),
    ("temperature-nan", "generate", sp(temperature=float("nan")), ValueError, ["temperature"]),
    ("temperature-str", "generate", sp(temperature="hot"), TypeError, ["temperature", "hot"]),
    ("top-p-zero", "generate", sp(top_p=0.0), ValueError, ["top_p"]),
    ("top-p-above-one", "generate", sp(top_p=1.5), ValueError, ["top_p", "1.5"]),
    ("top-k-zero", "generate", sp(top_k=0), ValueError, ["top_k"]),
    ("top-k-below-minus-one", "generate", sp(top_k=-2), ValueError, ["top_k", "-2"]),
    ("top-k-float", "generate", sp(top_k=2.5), TypeError, ["top_k"]),
    ("min-p-negative", "generate", sp(min_p=-0.1), ValueError, ["min_p"]),
    ("min-p-above-one", "generate", sp(min_p=1.1), ValueError, ["min_p"]),
    ("frequency-penalty", "generate", sp(frequency_penalty=2.5), ValueError, ["frequency_penalty", "2.5"]),
    ("presence-penalty", "generate", sp(presence_penalty=-3), ValueError, ["presence_penalty"]),
    ("repetition-penalty-zero", "generate", sp(repetition_penalty=0), ValueError, ["repetition_penalty"]),
    ("repetition-penalty-big", "generate", sp(repetition_penalty=3.0), ValueError, ["repetition_penalty"]),
    ("max-new-tokens-negative", "generate", sp(max_new_tokens=-1), ValueError, ["max_new_tokens", "-1"]),
    ("max-new-tokens-bool", "generate", sp(max_new_tokens=True), TypeError, ["max_new_tokens"]),
    ("min-over-max", "generate", sp(min_new_tokens=5), ValueError, ["min_new_tokens"]),
    ("n-zero", "generate", sp(n=0), ValueError, ["n must", "0"]),
    ("stop-int", "generate", sp(stop=5), TypeError, ["stop"]),
    ("stop-empty-string", "generate", sp(stop=["ok", ""]), TypeError, ["stop"]),
    ("stop-token-outside-vocab", "generate", sp(stop_token_ids=[49152]), ValueError, ["stop_token_ids", "49152"]),
    ("stop-token-str", "generate", sp(stop_token_ids=["2"]), TypeError, ["stop_token_ids"]),
    ("ignore-eos-str", "generate", sp(ignore_eos="yes"), TypeError, ["ignore_eos"]),
    ("skip-special-int", "generate", sp(skip_special_tokens=1), TypeError, ["skip_special_tokens"]),
    ("seed-str", "generate", sp(seed="abc"), TypeError, ["seed"]),
    ("seed-too-big", "generate", sp(seed=1 << 70), ValueError, ["seed"]),
    ("logit-bias-list", "generate", sp(logit_bias=[1, 2]), TypeError, ["logit_bias"]),
    ("logit-bias-key", "generate", sp(logit_bias={"x": 1.0}), TypeError, ["logit_bias", "'x'"]),
    ("logit-bias-float-key", "generate", sp(logit_bias={1.5: 1.0}), TypeError, ["logit_bias"]),
    ("logit-bias-outside-vocab", "generate", sp(logit_bias={99999: 1.0}), ValueError, ["logit_bias", "99999"]),
    ("logit-bias-value", "generate", sp(logit_bias={5: "big"}), TypeError, ["logit_bias"]),
    ("logit-bias-nan", "generate", sp(logit_bias={5: float("nan")}), ValueError, ["logit_bias"]),
    ("prompt-and-input-ids", "generate", gen(input_ids=[1, 2]), ValueError, ["prompt", "input_ids"]),
    ("neither-prompt-nor-ids", "generate", gen(prompt=None), ValueError, ["prompt", "input_ids"]),
    ("prompt-int", "generate", gen(prompt=5), TypeError, ["prompt"]),
    ("prompt-empty-list", "generate", gen(prompt=[]), TypeError, ["prompt"]),
    ("prompt-list-with-int", "generate", gen(prompt=["a", 3]), TypeError, ["prompt"]),
    ("prompt-empty-string", "generate", gen(prompt=""), ValueError, ["prompt", "empty"]),
    ("input-ids-outside-vocab", "generate", gen(prompt=None, input_ids=[1, 49152]), ValueError, ["input_ids", "49152"]),
    ("input-ids-negative", "generate", gen(prompt=None, input_ids=[[1], [-1]]), ValueError, ["input_ids", "-1"]),
    ("input-ids-str", "generate", gen(prompt=None, input_ids="1 2 3"), TypeError, ["input_ids"]),
    ("input-ids-ragged", "generate", gen(prompt=None, input_ids=[[1, 2], 3]), TypeError, ["input_ids"]),
    ("input-ids-bool", "generate", gen(prompt=None, input_ids=[[1, 2], [3, True]]), TypeError, ["input_ids"]),
    ("input-ids-float", "generate", gen(prompt=None, input_ids=[1, 2.0]), TypeError, ["input_ids"]),
    ("over-context", "generate", sp(max_new_tokens=9000), ValueError, ["max_new_tokens", "context length"]),
    (
        "long-prompt-over-context",
        "generate",
        gen(prompt=LONG_PROMPT, sampling_params=OK | {"max_new_tokens": 500}),
        ValueError,
        ["tokens", "max_new_tokens=500", "context length"],
    ),
    (
        "logprob-start-below",
        "generate",
        gen(return_logprob=True, logprob_start_len=-2),
        ValueError,
        ["logprob_start_len", "-2"],
    ),
    (
        "logprob-start-past-prompt",
        "generate",
        gen(return_logprob=True, logprob_start_len=50),
        ValueError,
        ["logprob_start_len", "50"],
    ),
    ("logprob-start-str", "generate", gen(logprob_start_len="0"), TypeError, ["logprob_start_len"]),
    (
        "top-logprobs-negative",
        "generate",
        gen(return_logprob=True, top_logprobs_num=-1),
        ValueError,
        ["top_logprobs_num"],
    ),
    ("return-logprob-str", "generate", gen(return_logprob="yes"), TypeError, ["return_logprob"]),
    ("hidden-states-str", "generate", gen(return_hidden_states="yes"), TypeError, ["return_hidden_states"]),
    ("stream-str", "generate", gen(stream="yes"), TypeError, ["stream"]),
    ("rid-int", "generate", gen(rid=5), TypeError, ["rid"]),
    ("rid-list-length", "generate", gen(prompt=["a", "b"], rid=["x"]), ValueError, ["rid", "1", "2"]),
    ("rid-duplicate", "generate", gen(prompt=["a", "b"], rid=["x", "x"]), ValueError, ["rid"]),
    (
        "params-list-length",
        "generate",
        gen(prompt=["a", "b"], sampling_params=[OK, OK, OK]),
        ValueError,
        ["sampling_params", "3", "2"],
    ),
    (
        "params-list-bad-entry",
        "generate",
        gen(prompt=["a", "b"], sampling_params=[OK, {"top_p": 2}]),
        ValueError,
        ["top_p"],
    ),
    ("chat-str", "chat", {"messages": "hi"}, TypeError, ["messages"]),
    ("chat-empty", "chat", {"messages": []}, TypeError, ["messages"]),
    ("chat-no-role", "chat", {"messages": [{"content": "hi"}]}, TypeError, ["messages[0]", "role"]),
    ("chat-role-int", "chat", {"messages": [{"role": 5, "content": "hi"}]}, TypeError, ["role"]),
    ("chat-no-content", "chat", {"messages": [{"role": "user"}]}, TypeError, ["messages[0]", "content"]),
    ("chat-content-int", "chat", {"messages": [{"role": "user", "content": 5}]}, TypeError, ["content"]),
    (
        "chat-second-conversation",
        "chat",
        {"messages": [[{"role": "user", "content": "a"}], ["b"]]},
        TypeError,
        ["messages[1][0]"],
    ),
    (
        "chat-list-content",
        "chat",
        {"messages": [{"role": "user", "content": ["parts"]}]},
        ValueError,
        ["messages", "chat template"],
    ),
    (
        "chat-bad-params",
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "sampling_params": {"n": -1}},
        ValueError,
        ["n must"],
    ),
]


@pytest.fixture(scope="module")
def engine():
    with Engine() as e:
        yield e


def test_the_matrix_is_large():
    assert len(CASES) >= 25


def _call(engine: Engine, kind: str, kwargs: dict):
    return engine.chat(**kwargs) if kind == "chat" else engine.generate(**kwargs)


async def _call_async(engine: Engine, kind: str, kwargs: dict):
    return await (engine.async_chat(**kwargs) if kind == "chat" else engine.async_generate(**kwargs))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_in_the_caller(engine, case):
    _, kind, kwargs, error, words = case
    with pytest.raises(error) as sync_info:
        _call(engine, kind, kwargs)
    with pytest.raises(error) as async_info:
        asyncio.run(_call_async(engine, kind, kwargs))
    for info in (sync_info, async_info):
        for word in words:
            assert word in str(info.value), (word, str(info.value))
    good = engine.generate("Hello", OK)
    assert good["meta_info"]["completion_tokens"] == 2
    assert good["meta_info"]["finish_reason"]["type"] == "length"


def test_nothing_leaks_after_rejected_calls(engine):
    assert_pool_free(engine)


def test_encode_on_a_generation_engine_is_an_error(engine):
    with pytest.raises(ValueError, match="is_embedding=True"):
        engine.encode("Hello")
    with pytest.raises(ValueError, match="is_embedding=True"):
        asyncio.run(engine.async_encode(["Hello", "there"]))


def test_rejected_stream_raises_before_iterating(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("Hello", {"top_p": 0}, stream=True)


def test_abort_by_rid_from_another_thread(engine):
    result: dict = {}

    def caller() -> None:
        result["out"] = engine.generate(
            "Count to a million: 1, 2, 3,", {"max_new_tokens": 4000, "ignore_eos": True}, rid="long-one"
        )

    thread = threading.Thread(target=caller)
    thread.start()
    for _ in range(600):  # wait until it runs (bounded: 60 s)
        if engine.get_server_info()["num_running"] == 1:
            break
        time.sleep(0.1)
    engine.abort("long-one")
    thread.join(timeout=60)
    assert not thread.is_alive()
    out = result["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["finish_reason"]["message"]
    assert out["meta_info"]["completion_tokens"] < 4000
    assert_pool_free(engine)
    assert engine.generate("Hello", OK, rid="after-abort")["meta_info"]["finish_reason"]["type"] == "length"


def test_a_rid_reused_right_after_its_abort_never_gets_the_old_requests_finish(engine):
    params = {"max_new_tokens": 4000, "ignore_eos": True}
    stream = engine.generate("Count to a million: 1, 2, 3,", params, rid="reused", stream=True)
    next(stream)  # running now
    engine.abort("reused")
    outcome = None
    for _ in range(100):  # the old request's final message is in flight for a moment
        try:
            outcome = engine.generate("Hello", OK, rid="reused")
            break
        except ValueError as exc:
            assert "reused" in str(exc)
            time.sleep(0.05)
    assert outcome is not None
    assert outcome["meta_info"]["finish_reason"]["type"] == "length"  # not the old request's abort
    stream.close()
    assert_pool_free(engine)


def test_abort_of_an_unknown_rid_is_harmless(engine):
    engine.abort(["no-such-request", "nor-this"])
    assert engine.generate("Hello", OK)["meta_info"]["completion_tokens"] == 2


# ---- a failure inside the scheduler ends its own request only ----
# No user input reaches a failing path once validation passes, so these drive a real Scheduler (real
# model, real KV pool, real sockets) in this process and make one request's own step fail.


@pytest.fixture()
def scheduler(tmp_path, default_model_path):
    import zmq

    from engine.shared.args import EngineArgs
    from engine.shared.ipc import Endpoints, pull_socket
    from scheduler_proc.scheduler import Scheduler

    args = EngineArgs(model_path=default_model_path, device="cpu", max_total_tokens=2048).resolve()
    endpoints = Endpoints.in_dir(str(tmp_path))
    context = zmq.Context()
    outbox = pull_socket(context, endpoints.detokenizer)
    frontend = pull_socket(context, endpoints.frontend)
    sched = Scheduler(args, endpoints, context)
    sched.outbox = outbox
    yield sched
    for sock in (sched.io.receiver, sched.io.to_detokenizer, sched.io.to_frontend, outbox, frontend):
        sock.close(linger=0)
    context.term()


def _run(sched, reqs) -> dict:
    """Submit reqs, run steps until every request is done; returns rid -> (output ids, finish reason)."""
    from engine.shared.protocol import Codec, GenerateBatch, TokenBatch

    sched.handle(GenerateBatch(reqs=reqs))
    for _ in range(100):
        if not (sched.waiting or sched.running):
            break
        sched.iterate()  # the real loop's turn: nothing to receive, since nothing is sent to its socket
    codec, results = Codec(TokenBatch), {r.rid: ([], None) for r in reqs}
    while any(finish is None for _, finish in results.values()):
        assert sched.outbox.poll(30_000), "a request never finished"  # delivery over IPC is asynchronous
        batch = codec.decode(sched.outbox.recv())
        for rid, ids, finish in zip(batch.rids, batch.new_token_ids, batch.finish):
            results[rid] = (results[rid][0] + ids, finish or results[rid][1])
    return results


def _assert_pool_free(sched) -> None:
    """No slot leaked: free slots plus those the prefix cache keeps make the whole pool."""
    info = sched.server_info()
    assert info["kv_free_tokens"] + info.get("kv_cached_tokens", 0) == info["kv_pool_tokens"]
    assert not sched.running and not sched.waiting


def _request(rid: str, **kwargs):
    from engine.shared.protocol import GenerateRequest
    from engine.shared.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, stop=kwargs.pop("stop", []))
    return GenerateRequest(rid=rid, input_ids=[504, 3575, 282, 4649, 314], sampling=params, **kwargs)


def test_a_failing_stop_check_ends_only_its_request(scheduler, monkeypatch):
    checker = scheduler.finish_checker
    real = checker._stop_string

    def stop_string(req):
        if "boom" in req.sampling.stop:
            raise RuntimeError("stop check exploded")
        return real(req)

    monkeypatch.setattr(checker, "_stop_string", stop_string)
    alone = _run(scheduler, [_request("alone")])["alone"]
    results = _run(scheduler, [_request("a"), _request("bad", stop=["boom"]), _request("b", stop=["zzz"])])
    bad_ids, bad_finish = results["bad"]
    assert bad_finish.type == "abort" and "stop check exploded" in bad_finish.message
    assert len(bad_ids) == 1  # it ended at its first check
    for rid in ("a", "b"):
        assert results[rid] == (alone[0], alone[1]), rid
        assert results[rid][1].type == "length"
    _assert_pool_free(scheduler)


def test_a_failing_logprob_record_ends_only_its_request(scheduler, monkeypatch):
    import scheduler_proc.step_outputs as step_outputs

    real = step_outputs._record_logprobs

    def record(req, *args):
        if req.rid == "bad":
            raise ValueError("logprobs exploded")
        return real(req, *args)

    monkeypatch.setattr(step_outputs, "_record_logprobs", record)
    results = _run(scheduler, [_request("a", return_logprob=True), _request("bad", return_logprob=True)])
    assert results["bad"][1].type == "abort" and "logprobs exploded" in results["bad"][1].message
    assert results["a"][1].type == "length" and len(results["a"][0]) == 6
    _assert_pool_free(scheduler)


def test_a_failing_step_aborts_its_requests_and_the_scheduler_goes_on(scheduler, monkeypatch):
    runner = scheduler.runner
    real = runner.forward
    calls = {"n": 0}

    def forward(batch):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("device fault")
        return real(batch)

    monkeypatch.setattr(runner, "forward", forward)
    results = _run(scheduler, [_request("a"), _request("b")])
    for rid in ("a", "b"):
        assert results[rid][1].type == "abort" and "device fault" in results[rid][1].message
    after = _run(scheduler, [_request("c")])["c"]
    assert after[1].type == "length" and len(after[0]) == 6
    _assert_pool_free(scheduler)
