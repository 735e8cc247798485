import os

# Before torch loads (OpenMP and torch's CPU allocator read these once), unless the caller set them:
# - OpenMP threads that finish early spin only briefly (about 0.1 ms, not libgomp's default of
#   several ms) before sleeping. Long spinning keeps both cores busy between kernels; once other
#   processes want them too, every parallel kernel waits for a preempted thread and a step took up to
#   ten times longer on 2 shared cores. Not spinning at all costs a wake-up per kernel (+40% on an
#   idle machine); this count was as fast as the default there.
# - Buffers of 2 MiB and more (weights, KV pool) get transparent huge pages: fewer TLB misses when
#   every decode step streams all weights and gathers KV rows.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from engine.shared.child_process import child_main  # noqa: E402
from scheduler_proc.scheduler import run_scheduler  # noqa: E402

child_main("scheduler", run_scheduler)
