"""Issue 22, data parallelism on CPU: Engine(dp_size=2) gives one engine's greedy outputs and both replicas
take work; prompts sharing a start are served from the replica that caches it; aborts, flush_cache,
server info, weight updates and memory release reach every replica; a killed replica fails only its
waiting callers, at once, and the others go on serving; no process outlives shutdown() or a killed parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from reference import assert_pool_free, tiny_model_dir
from test_lifecycle import PROJECT_ROOT, alive, wait_until

from engine import Engine
from engine.serve import parse_args
from engine.shared.args import EngineArgs
from engine.shared.errors import EngineError

SMALL = {"max_total_tokens": 4096, "max_running_requests": 8}
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
LONG = {"temperature": 0, "max_new_tokens": 1000, "ignore_eos": True}  # a minute of decoding on a CPU
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 2000, 30], [4242] * 11, [9, 99, 999, 9999, 19, 29], [5] * 40, [77, 78]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path) -> str:
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", default_model_path)


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, dp_size=2, **SMALL) as engine:
        yield engine


@pytest.fixture(scope="module")
def expected(model_dir) -> list[list[int]]:
    """One engine's greedy output ids for PROMPTS."""
    with Engine(model_dir, **SMALL) as one:
        return [out["output_ids"] for out in one.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def _pids(engine: Engine) -> list[int]:
    return engine._processes.pids + engine.get_server_info()["tp_worker_pids"]


def test_dp2_equals_one_engine_and_both_replicas_take_work(engine, expected):
    assert engine.flush_cache()["ok"]
    outputs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outputs] == expected
    info = assert_pool_free(engine)
    assert info["dp_size"] == 2 and len(info["internal_states"]) == 2
    for replica in info["internal_states"]:  # each one's prefix cache holds the prompts it served
        assert replica["alive"] and replica["kv_cached_tokens"] > 0, replica
        assert replica["outstanding_requests"] == 0 and replica["num_running"] == 0
    assert info["kv_pool_tokens"] == sum(r["kv_pool_tokens"] for r in info["internal_states"])


def test_dp2_of_tp2_ranks_equals_one_engine(model_dir, expected):
    """Each replica's two ranks meet at their own rendezvous, on their own command socket."""
    with Engine(model_dir, dp_size=2, tp_size=2, **SMALL) as engine:
        outputs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        info = engine.get_server_info()
        pids = _pids(engine)
    assert [o["output_ids"] for o in outputs] == expected
    assert len(info["tp_worker_pids"]) == 2 and len(pids) == 5  # 2 schedulers, their 2 ranks, 1 detokenizer
    assert [len(r["rank_memory"]) for r in info["internal_states"]] == [2, 2]
    assert not any(alive(pid) for pid in pids)


def test_prompts_sharing_a_start_are_served_by_the_replica_that_caches_it(engine):
    assert engine.flush_cache()["ok"]
    system = [(31 * i) % 20000 + 10 for i in range(100)]
    first = engine.generate(input_ids=system + [7], sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    # One batch: least-loaded dispatch alone would send half of them to the replica without the prefix.
    outputs = engine.generate(input_ids=[system + [i, i + 1] for i in range(4)], sampling_params=GREEDY)
    assert [o["meta_info"]["cached_tokens"] for o in outputs] == [100] * 4


def test_aborted_streams_are_stopped_on_their_replicas(engine):
    stream = engine.generate(input_ids=[[1, 2, 3], [4, 5, 6]], sampling_params=LONG, stream=True)
    next(stream)
    busy = engine.get_server_info()["internal_states"]
    assert [r["outstanding_requests"] for r in busy] == [1, 1]  # one on each replica
    stream.close()  # leaving the stream aborts both requests, each on the replica that holds it
    assert_pool_free(engine)


def test_control_calls_reach_every_replica(engine, model_dir):
    norm = torch.tensor(engine.get_weights_by_name("model.norm.weight"))
    ok, message = engine.update_weights_from_tensor([("model.norm.weight", torch.zeros_like(norm))])
    assert ok, message
    # A zero final norm makes every logit 0: greedy picks token 0, on whichever replica a prompt runs.
    outputs = engine.generate(input_ids=PROMPTS[:4], sampling_params=GREEDY)
    assert all(o["output_ids"] == [0] * 16 for o in outputs)
    assert engine.update_weights_from_tensor([("model.norm.weight", norm)])[0]
    engine.release_memory_occupation()
    released = [r["memory_released"] for r in engine.get_server_info()["internal_states"]]
    assert released[0] and released == [released[0]] * 2
    engine.resume_memory_occupation()
    assert [r["memory_released"] for r in engine.get_server_info()["internal_states"]] == [[], []]
    assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"] != [0] * 16


def test_a_killed_replica_fails_its_callers_at_once_and_the_other_serves(model_dir):
    with Engine(model_dir, dp_size=2, **SMALL) as engine:
        pids = _pids(engine)
        errors: list[BaseException] = []

        def wait_on_a_long_request() -> None:
            try:
                engine.generate(input_ids=[1, 2, 3], sampling_params=LONG)
            except BaseException as exc:
                errors.append(exc)

        callers = [threading.Thread(target=wait_on_a_long_request) for _ in range(2)]
        for caller in callers:  # the second goes to the other (least loaded) replica
            caller.start()
            time.sleep(0.5)
        running = lambda: [r["num_running"] for r in engine.get_server_info()["internal_states"]]  # noqa: E731
        wait_until(lambda: running() == [1, 1], "a request running on each replica", 60)
        os.kill(engine._processes.procs["scheduler replica 1"].pid, signal.SIGKILL)
        callers[1].join(5)  # failed within seconds, not when its 1000 tokens would have been done
        assert not callers[1].is_alive() and "scheduler replica 1" in str(errors[0]), errors
        assert callers[0].is_alive()  # replica 0's request goes on
        info = engine.get_server_info()
        assert [r["alive"] for r in info["internal_states"]] == [True, False]
        assert "killed by SIGKILL" in info["internal_states"][1]["error"]
        assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]  # replica 0 serves
    callers[0].join(10)
    assert isinstance(errors[-1], EngineError) and "shut down" in str(errors[-1])
    wait_until(lambda: not any(alive(pid) for pid in pids), "every process to exit", 5)


def test_no_process_outlives_the_killed_parent(model_dir):
    script = (
        "import json, sys, time\n"
        "from engine import Engine\n"
        f"engine = Engine({model_dir!r}, dp_size=2, max_total_tokens=4096, max_running_requests=8)\n"
        "print(json.dumps(engine._processes.pids), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == 3 and all(alive(pid) for pid in pids)  # two scheduler replicas, one detokenizer
    finally:
        parent.kill()
        parent.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), "both replicas and the detokenizer to exit")


def test_dp_size_is_a_validated_setting_and_a_server_flag(model_dir):
    with pytest.raises(ValueError, match="dp_size"):
        EngineArgs(model_path=model_dir, dp_size=0).validate()
    assert parse_args(["--dp-size", "2"])[1]["dp_size"] == 2
