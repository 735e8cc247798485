"""The engine's child processes (scheduler, detokenizer): start, watch, stop; and their IPC directory."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from engine.shared.args import EngineArgs
from engine.shared.child_process import MULTICAST_OFF_ENV
from engine.shared.ipc import Endpoints

logger = logging.getLogger(__name__)

_ROLES = ("scheduler", "detokenizer")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildProcesses:
    """Owns a private (0700) directory holding the IPC sockets and args, and the child processes."""

    def __init__(self, args: EngineArgs) -> None:
        self.dir = tempfile.mkdtemp(prefix="ferry-")  # mode 0700: only this user reaches the sockets
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            f.write(args.to_json())
        self.endpoints = Endpoints.in_dir(self.dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.worker_pids: list[int] = []  # tensor-parallel ranks 1.., the scheduler's children
        self.stopping = False

    def start(self) -> None:
        env = dict(os.environ)
        # Children import our packages by module name; make that work from a source checkout too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(MULTICAST_OFF_ENV)
        for role in _ROLES:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", f"{role}_proc", self.dir, str(os.getpid())],
                env=env,
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C goes to the caller, who decides what stops.
                start_new_session=True,
            )

    def exit_status(self) -> Optional[str]:
        """A message if a child has exited (while the engine was meant to be running), else None."""
        if self.stopping:
            return None
        for role, proc in self.procs.items():
            code = proc.poll()
            if code is not None and code < 0:
                return f"the {role} process exited, killed by {signal.Signals(-code).name}"
            if code is not None:
                return f"the {role} process exited with code {code}"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for role, proc in self.procs.items():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s process did not stop in %.0fs; killing it", role, timeout)
                proc.kill()
                proc.wait()
        _wait_gone(self.worker_pids, timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait for processes that are not our children (tensor-parallel workers, which the kernel kills
    when the scheduler exits) to be gone; SIGKILL any worker still there after timeout."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _running(pid):
            if time.monotonic() > deadline:
                _kill_worker(pid)
                break
            time.sleep(0.01)


def _running(pid: int) -> bool:
    """True while pid runs; an exited process awaiting its reaper (a zombie) holds nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_worker(pid: int) -> None:
    # Only if pid is still a worker: a pid the system has given to another process since is not ours.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"scheduler_proc.tp.worker_main" not in f.read():
                return
        logger.warning("tensor-parallel worker %d still running; killing it", pid)
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
