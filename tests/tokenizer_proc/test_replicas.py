"""Data parallelism's dispatch (tokenizer_proc/replicas.py), without processes: the least loaded replica
takes a request, a prompt starting like an earlier one goes where that one went unless that replica is
much busier, aborts go to the replica holding the rid, and a lost replica takes nothing more."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from engine.shared.ipc import Endpoints, pull_socket
from engine.shared.protocol import AbortRequest, GenerateBatch, GenerateRequest, SchedulerInput
from engine.shared.sampling import SamplingParams
from tokenizer_proc.replicas import Replicas


@pytest.fixture
def wired(tmp_path):
    """Replicas over two real sockets, and what each replica's socket received."""
    context = zmq.Context()
    endpoints = Endpoints.in_dir(str(tmp_path))
    receivers = [pull_socket(context, Endpoints.in_dir(str(tmp_path), r).scheduler) for r in range(2)]
    replicas = Replicas(context, endpoints, 2)
    decoder = msgspec.msgpack.Decoder(SchedulerInput)

    def received(replica: int) -> list:
        messages = []
        while receivers[replica].poll(200):
            messages.append(decoder.decode(receivers[replica].recv()))
        return messages

    yield replicas, received
    context.destroy(linger=0)


def request(rid: str, input_ids: list[int], max_new_tokens: int = 16) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=input_ids, sampling=SamplingParams(max_new_tokens=max_new_tokens))


def test_the_least_loaded_replica_takes_each_request(wired):
    replicas, received = wired
    replicas.send([request("a", [1] * 500), request("b", [2] * 10), request("c", [3] * 10), request("d", [4] * 10)])
    assert replicas.owner == {"a": 0, "b": 1, "c": 1, "d": 1}  # one batch, spread as it is dispatched
    assert replicas.loads == [516, 78] and replicas.counts == [1, 3]
    assert [[r.rid for r in m.reqs] for m in received(0)] == [["a"]]
    assert [[r.rid for r in m.reqs] for m in received(1)] == [["b", "c", "d"]]
    replicas.finished("a")
    replicas.send([request("e", [5] * 10)])
    assert replicas.owner["e"] == 0 and replicas.loads == [26, 78]


def test_a_shared_prompt_start_prefers_its_replica_until_that_one_is_much_busier(wired):
    replicas, _ = wired
    system = list(range(100, 200))  # a 100-token "system prompt"
    replicas.send([request("first", system + [1])])
    replicas.send([request(f"same{i}", system + [i + 2], max_new_tokens=500) for i in range(8)])
    assert {replicas.owner[f"same{i}"] for i in range(8)} == {0}  # not spread: replica 0 holds the prefix
    replicas.send([request("other", list(range(900, 1000)))])
    assert replicas.owner["other"] == 1  # a new start goes to the least loaded
    replicas.send([request(f"big{i}", system + [i], max_new_tokens=4000) for i in range(3)])
    # Replica 0 (12,000 tokens outstanding) is now much busier than replica 1: the start moves there.
    assert [replicas.owner[f"big{i}"] for i in range(3)] == [0, 1, 1]
    replicas.send([request("short", system[:10])])  # too short to key the table: least loaded
    assert replicas.owner["short"] == 1


def test_aborts_go_to_the_replica_holding_each_rid(wired):
    replicas, received = wired
    replicas.send([request("a", [1] * 10), request("b", [2] * 10)])
    received(0), received(1)
    replicas.abort(["b", "a", "unknown"])
    assert [m.rids for m in received(0) if isinstance(m, AbortRequest)] == [["a"]]
    assert [m.rids for m in received(1) if isinstance(m, AbortRequest)] == [["b"]]
    assert replicas.loads == [0, 0] and replicas.counts == [0, 0]


def test_a_lost_replica_returns_its_rids_and_takes_no_more(wired):
    replicas, received = wired
    replicas.send([request("a", [1] * 10), request("b", [2] * 10), request("c", [3] * 10)])
    assert replicas.lose(1, "killed") == ["b"]
    assert replicas.lose(1, "again") == []  # reported once
    assert replicas.live() == [0]
    replicas.send([request(f"n{i}", [i] * 10) for i in range(3)])
    assert all(replicas.owner[f"n{i}"] == 0 for i in range(3))
    assert replicas.load_info(1) == {
        "dp_rank": 1,
        "alive": False,
        "outstanding_requests": 0,
        "outstanding_tokens": 0,
        "error": "killed",
    }
    assert all(isinstance(m, GenerateBatch) for m in received(1))
