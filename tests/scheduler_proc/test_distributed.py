"""The tensor-parallel group's collectives, in two real gloo processes: rank 0's commands (small and large,
over the command channel), a step's hand-off (its ForwardBatch and req_to_token writes arrive whole on
rank 1), the logits gather's rank order, all-reduce, min, gather."""

from __future__ import annotations

import os
import subprocess
import sys

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANK_SCRIPT = """
import sys, torch
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.tp.group import join_group
from scheduler_proc.tp.step_broadcast import STEP, StepChannel
rank, init_file = int(sys.argv[1]), sys.argv[2]
tp = join_group(rank, 2, f"file://{init_file}", torch.device("cpu"))
for n in (0, 1, 4096, 100000):
    sent = torch.arange(n, dtype=torch.int64) * 7 - 3
    got = tp.broadcast_ints(sent if rank == 0 else None)
    assert torch.equal(got, sent), (rank, n, got[:5], got.shape)
channel = StepChannel(tp, torch.device("cpu"))
for size, decode in ((3, False), (64, True)):
    ids = torch.arange(size, dtype=torch.int64)
    step = ForwardBatch(ids + 7, ids + 500, ids + 9000, ids, [500] * size, [1] * size, ids[-2:], is_decode=decode)
    writes = (ids, ids + 500, ids + 9000)
    if rank == 0:
        channel.send(step, writes)
        continue
    packet = tp.broadcast_ints()
    assert int(packet[0]) == STEP
    got, got_writes = channel.receive(packet)
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "logit_rows"):
        assert torch.equal(getattr(got, name), getattr(step, name)), name
    assert (got.prefix_lens_cpu, got.extend_lens_cpu, got.is_decode) == ([500] * size, [1] * size, decode)
    assert all(torch.equal(a, b) for a, b in zip(got_writes, writes))
x = torch.full((2, 3), float(rank + 1))
assert torch.equal(tp.all_reduce(x), torch.full((2, 3), 3.0))
logits = tp.gather_last_dim(torch.tensor([[10.0 * rank, 10.0 * rank + 1]]))
assert (logits.tolist() == [[0.0, 1.0, 10.0, 11.0]]) if rank == 0 else logits is None, logits
assert tp.min_over_ranks(100 - rank) == 99
figures = tp.gather_ints([rank, 5 * rank])
assert figures == ([[0, 0], [1, 5]] if rank == 0 else None), figures
torch.distributed.destroy_process_group()
print("ok", rank)
"""


def test_collectives_of_two_gloo_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    init_file = str(tmp_path / "init")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(r), init_file],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=120) for p in ranks]
    for rank, (proc, (out, err)) in enumerate(zip(ranks, results)):
        assert proc.returncode == 0 and f"ok {rank}" in out, err[-3000:]
