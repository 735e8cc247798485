"""The CPU cores the scheduler process may really use, and torch's host threads sized by them.

A container often sees every core of its host (the affinity mask) while a cgroup quota lets it run on a
few. torch sizes its OpenMP pool by what it sees: a host tensor op then wakes a thread per visible core,
and under the quota those threads are throttled mid-region (on the device, filling a 1.5 MB grammar mask
took 2-5 ms where it takes 0.1 ms).
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
