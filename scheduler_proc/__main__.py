import os

# Before torch loads (OpenMP and torch's CPU allocator read these once), unless the caller set them:
# - OpenMP threads that finish early wait on a futex instead of spinning for milliseconds. Spinning
#   takes the cores that the detokenizer, the frontend and any other process need, and once the
#   machine is oversubscribed a step can take several times longer (measured on 2 shared cores).
# - Buffers of 2 MiB and more (weights, KV pool) get transparent huge pages: every decode step
#   streams all weights and gathers KV rows, which costs fewer TLB misses on huge pages.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from engine.child_process import child_main  # noqa: E402
from scheduler_proc.scheduler import run_scheduler  # noqa: E402

child_main("scheduler", run_scheduler)
