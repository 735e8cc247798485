"""The scheduler's host threads: a cgroup CPU quota caps the cores it counts (v2 and v1 files), and
torch runs one host thread beside a GPU, every usable core on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from scheduler_proc import host_cpus


@pytest.mark.parametrize(
    "files, quota",
    [
        ({"cpu.max": "250000 100000\n"}, 3),  # 2.5 cores of time: 3 threads may run
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "800000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_quota_in_whole_cores(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert host_cpus._cgroup_quota(str(tmp_path)) == quota


def test_usable_cores_are_the_affinity_capped_by_the_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(host_cpus, "_cgroup_quota", lambda: None)
    assert host_cpus.usable_cores() == affinity
    monkeypatch.setattr(host_cpus, "_cgroup_quota", lambda: 1)
    assert host_cpus.usable_cores() == 1
    monkeypatch.setattr(host_cpus, "_cgroup_quota", lambda: affinity + 5)
    assert host_cpus.usable_cores() == affinity


def test_torch_threads_one_beside_a_gpu_every_usable_core_on_the_cpu(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(host_cpus, "usable_cores", lambda: 2)
    try:
        host_cpus.size_torch_threads(torch.device("cuda", 0))
        assert torch.get_num_threads() == 1
        host_cpus.size_torch_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
