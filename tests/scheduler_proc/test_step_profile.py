"""The step profile's host parts: each part of a loop turn is timed between the scheduler's marks, kept with
the step that turn queued, and the benchmark harness reports each part's median over full-batch steps."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from engine.bench import step_stats
from scheduler_proc.step_profile import StepProfiler


def _turn(profiler: StepProfiler, queue: bool, schedule_s: float) -> None:
    profiler.mark(None)
    time.sleep(schedule_s)
    profiler.mark("schedule")
    if queue:
        profiler.begin(SimpleNamespace(is_decode=True, batch_size=8))
        profiler.end()
    profiler.mark("launch")
    time.sleep(0.001)
    profiler.turn_done("send")


def test_parts_go_with_the_step_their_turn_queued():
    profiler = StepProfiler(100, torch.device("cpu"))
    start = time.perf_counter()
    for schedule_s in (0.004, 0.004, 0.004):
        _turn(profiler, queue=True, schedule_s=schedule_s)
    _turn(profiler, queue=False, schedule_s=0.05)  # queued nothing: its parts belong to no step
    _turn(profiler, queue=True, schedule_s=0.004)
    _turn(profiler, queue=True, schedule_s=0.004)  # the last step's host time is known at the next launch only
    summary = profiler.summary()
    parts = summary["host_parts"]
    assert len(parts) == 4 and all(set(p) == {"schedule", "launch", "send"} for p in parts)
    assert all(4.0 <= p["schedule"] < 40.0 and p["send"] >= 1.0 for p in parts)  # not the idle turn's 50 ms
    stats = step_stats(summary, start, time.perf_counter())
    assert stats["profile_steps"] == 4
    assert 4.0 <= stats["step_host_parts_ms_p50"]["schedule"] < 40.0


def test_marks_cost_nothing_when_profiling_is_off():
    profiler = StepProfiler(0, torch.device("cpu"))
    _turn(profiler, queue=True, schedule_s=0.0)
    assert profiler.records == [] and profiler._parts == {}


def test_host_cpu_time_leaves_out_what_the_thread_did_not_run():
    # A turn slowed by the host (the thread descheduled, or waiting for the GIL) shows host time without CPU time.
    profiler = StepProfiler(100, torch.device("cpu"))
    for busy in (True, False, True, False):
        profiler.begin(SimpleNamespace(is_decode=True, batch_size=8))
        profiler.end()
        start = time.perf_counter()
        if busy:
            while time.perf_counter() - start < 0.02:
                pass
        else:
            time.sleep(0.02)
        profiler.waited(0.0, 0.0)
    profiler.begin(SimpleNamespace(is_decode=True, batch_size=8))
    summary = profiler.summary()
    assert all(ms >= 20.0 for ms in summary["host_ms"])
    busy_cpu, idle_cpu = summary["host_cpu_ms"][0::2], summary["host_cpu_ms"][1::2]
    assert all(ms >= 10.0 for ms in busy_cpu) and all(ms < 5.0 for ms in idle_cpu), summary["host_cpu_ms"]
    stats = step_stats(summary, 0.0, time.perf_counter())
    assert "step_host_cpu_ms_p50" in stats
