"""Per-step timing of steps, for the benchmark harness (`--profile-steps`): how long the device
worked on each step, how long it sat idle before it, and how much host time the loop spent per step,
wall and on the scheduler thread's CPU (less than the wall where the thread was descheduled or waited for the
GIL: a slow host turn is then not the loop's own work).

Device times come from CUDA events read once they have completed, so recording never waits for the
device. Off (`profile_steps=0`) it costs one branch per step (and per mark).

The scheduler's loop also marks the end of each part of a turn (mark()): the host time of each part,
kept with the step the turn queued, says where a host-bound step's time goes.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from scheduler_proc.forward_batch import ForwardBatch


class StepProfiler:
    def __init__(self, max_steps: int, device: torch.device) -> None:
        self.max_steps = max_steps
        self.cuda = device.type == "cuda"
        # [is decode, batch size, start event, end event, host ms, clock, {turn part: host ms}, host CPU ms]
        self.records: list[list[Any]] = []
        self._last_launch: Optional[float] = None
        self._last_cpu = 0.0
        self._waited = 0.0  # seconds blocked on the device since the last launch
        self._waited_cpu = 0.0  # the thread's CPU seconds in those waits (a spinning wait uses its CPU)
        self._parts: dict[str, float] = {}  # this turn's host ms by part, so far
        self._last_mark = 0.0
        self._queued = False  # this turn queued a step

    @property
    def active(self) -> bool:
        return len(self.records) < self.max_steps

    def begin(self, batch: ForwardBatch) -> None:
        """Just before a step is queued."""
        if not self.active:
            return
        now, cpu = time.perf_counter(), time.thread_time()
        host_ms = cpu_ms = None
        if self._last_launch is not None:
            host_ms = (now - self._last_launch - self._waited) * 1e3
            cpu_ms = (cpu - self._last_cpu - self._waited_cpu) * 1e3
        self._last_launch, self._last_cpu, self._waited, self._waited_cpu = now, cpu, 0.0, 0.0
        if self.records:  # the host time between the previous launch and this one
            self.records[-1][4], self.records[-1][7] = host_ms, cpu_ms
        self.records.append([batch.is_decode, batch.batch_size, self._event(), None, None, now, None, None])
        self._queued = True

    def end(self) -> None:
        """Just after the step (forward and sampling) is queued."""
        if self.records and self.records[-1][3] is None:
            self.records[-1][3] = self._event()

    def waited(self, seconds: float, cpu_seconds: float) -> None:
        self._waited += seconds
        self._waited_cpu += cpu_seconds

    def mark(self, part: Optional[str]) -> None:
        """The host time since the last mark went to `part` of the loop's turn; None: a turn starts."""
        if not self.active:
            return
        now = time.perf_counter()
        if part is None:
            self._parts, self._queued = {}, False
        else:
            self._parts[part] = self._parts.get(part, 0.0) + (now - self._last_mark) * 1e3
        self._last_mark = now

    def turn_done(self, last_part: str) -> None:
        """The turn ended with `last_part`: its parts' host times go with the step it queued (a turn that
        queued none: dropped)."""
        self.mark(last_part)
        if self._queued:  # begin() appended that step this turn
            self.records[-1][6] = self._parts
        self._parts, self._queued = {}, False

    def _event(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def summary(self) -> dict[str, list]:
        """Per recorded step: whether it only decodes, batch size, device ms, device idle ms before it, host ms,
        the host clock (time.perf_counter, shared by the processes of one machine) when it was queued, the
        host ms of each part of the turn that queued it (None where unknown), and the host ms on the CPU."""
        out: dict[str, list] = {
            "decode": [],
            "batch_size": [],
            "gpu_ms": [],
            "gap_ms": [],
            "host_ms": [],
            "clock": [],
            "host_parts": [],
            "host_cpu_ms": [],
        }
        previous_end = None
        for is_decode, size, start, end, host_ms, clock, parts, cpu_ms in self.records:
            if end is None or host_ms is None or (self.cuda and not end.query()):
                previous_end = None
                continue
            if self.cuda:
                gpu_ms = start.elapsed_time(end)
                gap_ms = previous_end.elapsed_time(start) if previous_end is not None else None
            else:
                gpu_ms, gap_ms = (end - start) * 1e3, None
            previous_end = end
            out["decode"].append(is_decode)
            out["batch_size"].append(size)
            out["gpu_ms"].append(gpu_ms)
            out["gap_ms"].append(gap_ms)
            out["host_ms"].append(host_ms)
            out["clock"].append(clock)
            out["host_parts"].append(parts)
            out["host_cpu_ms"].append(cpu_ms)
        return out
