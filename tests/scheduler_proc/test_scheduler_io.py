"""The scheduler's sockets: a large batch of requests arrives whole and is decoded without the garbage
collector walking the process's heap meanwhile."""

from __future__ import annotations

import gc

import msgspec
import zmq

from engine.shared.ipc import Endpoints, push_socket
from engine.shared.protocol import GenerateBatch, GenerateRequest
from engine.shared.sampling import SamplingParams
from scheduler_proc.scheduler_io import SchedulerIO


def test_a_large_batch_is_decoded_whole_without_a_collection(tmp_path):
    context = zmq.Context()
    endpoints = Endpoints.in_dir(str(tmp_path))
    io = SchedulerIO(endpoints, context)
    sender = push_socket(context, endpoints.scheduler)
    params = SamplingParams(max_new_tokens=4)
    reqs = [
        GenerateRequest(rid=str(i), input_ids=[i % 500 + j for j in range(64)], sampling=params) for i in range(2048)
    ]
    sender.send(msgspec.msgpack.encode(GenerateBatch(reqs=reqs)))
    collections = []
    gc.collect()  # every generation's count from zero: what follows does not depend on the tests before

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(record)
    try:
        messages = io.receive(block=True)
    finally:
        gc.callbacks.remove(record)
    # At most one young collection, of what was just decoded, at the first allocation after it (without the
    # pause: 18 of them here, two of the middle generation, and full ones once enough requests are live).
    assert collections in ([], [0]), collections
    assert gc.isenabled()
    assert [r.input_ids for r in messages[0].reqs] == [r.input_ids for r in reqs]
    for sock in (sender, io.receiver, io.to_detokenizer, io.to_frontend):
        sock.close()
    context.term()
