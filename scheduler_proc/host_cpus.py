"""The CPU cores the scheduler process may use, and torch's host threads sized by them.

torch sizes its OpenMP pool by the cores it sees (32 on the device's host). Beside a GPU the scheduler's
host tensor ops are small, and a pool that wide only adds wake-ups that contend with xgrammar, the
frontend and the detokenizer: on the device, resetting a 1.5 MB grammar mask took 2-5 ms with 32 threads
(0.1 ms here with 2), and one thread (with the reset a numpy memset) took a constrained Qwen2.5-0.5B step at
batch 256 from 16.9 to 7.1 ms. On the CPU the pool runs the model, sized by the cores a cgroup quota
really allows (a container may see every core of its host and run on a few).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch


def usable_cores() -> int:
    """Cores in this process's affinity mask, capped by the cgroup's CPU quota when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota)) if quota is not None else cores


def _cgroup_quota(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The CPU quota in whole cores (cgroup v2, then v1), or None when unlimited or unknown."""
    for quota_file, period_file in (
        (f"{root}/cpu.max", None),
        (f"{root}/cpu/cpu.cfs_quota_us", f"{root}/cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields.append(f.read().strip())
            if fields[0] in ("max", "-1"):
                return None
            return math.ceil(int(fields[0]) / int(fields[1]))
        except (OSError, ValueError, IndexError):
            continue
    return None


def size_torch_threads(device: torch.device) -> None:
    """On a GPU the scheduler's host tensor ops are small (index lists, a mask): one thread runs them
    without waking a pool. On the CPU torch computes the model: every usable core, and no more."""
    torch.set_num_threads(1 if device.type == "cuda" else usable_cores())
