"""The tensor-parallel group's collectives, in two real gloo processes: the step broadcast at sizes around
its one-packet limit (one broadcast or two), the logits gather's rank order, all-reduce, min, gather."""

from __future__ import annotations

import os
import subprocess
import sys

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANK_SCRIPT = """
import sys, torch
from scheduler_proc.tp.group import join_group
rank, init_file = int(sys.argv[1]), sys.argv[2]
tp = join_group(rank, 2, init_file, torch.device("cpu"))
for n in (0, 1, 4095, 4096, 9000):  # the packet holds 4095 ints after its length
    sent = torch.arange(n, dtype=torch.int64) * 7 - 3
    got = tp.broadcast_ints(sent if rank == 0 else None)
    assert torch.equal(got, sent), (rank, n, got[:5], got.shape)
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
