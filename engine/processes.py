"""The engine's child processes (the scheduler, or dp_size scheduler replicas, and the detokenizer): start,
watch, stop; and their IPC directory."""

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
from engine.shared.ipc import Endpoints, replica_name

logger = logging.getLogger(__name__)

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildProcesses:
    """Owns a private (0700) directory holding the IPC sockets and args, and the child processes."""

    def __init__(self, args: EngineArgs) -> None:
        self.dir = tempfile.mkdtemp(prefix="ferry-")  # mode 0700: only this user reaches the sockets
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            f.write(args.to_json())
        self.endpoints = Endpoints.in_dir(self.dir)
        # name -> (module, its scheduler replica or None); schedulers first, as their start-up is the longest
        self.roles: dict[str, tuple[str, Optional[int]]] = {
            replica_name("scheduler", r, args.dp_size): ("scheduler_proc", r) for r in range(args.dp_size)
        }
        self.roles["detokenizer"] = ("detokenizer_proc", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.worker_pids: list[int] = []  # tensor-parallel ranks 1.., the schedulers' children
        self.reported: set[str] = set()  # children whose exit exits() has returned
        self.stopping = False

    def start(self) -> None:
        env = dict(os.environ)
        # Children import our packages by module name; make that work from a source checkout too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(MULTICAST_OFF_ENV)
        for name, (module, replica) in self.roles.items():
            replica_arg = [] if replica is None else [str(replica)]
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module, self.dir, str(os.getpid()), *replica_arg],
                env=env,
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C goes to the caller, who decides what stops.
                start_new_session=True,
            )

    def exits(self) -> list[tuple[Optional[int], str]]:
        """Children that exited since the last call (while the engine was meant to be running): each
        one's scheduler replica (None: the detokenizer) and a message saying how it exited."""
        if self.stopping:
            return []
        found = []
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is None or name in self.reported:
                continue
            self.reported.add(name)
            how = f", killed by {signal.Signals(-code).name}" if code < 0 else f" with code {code}"
            found.append((self.roles[name][1], f"the {name} process exited{how}"))
        return found

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
