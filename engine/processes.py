"""The engine's child processes (scheduler, detokenizer): start, watch, stop; and their IPC directory."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Optional

from engine.args import EngineArgs
from engine.ipc import Endpoints

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
        self.stopping = False

    def start(self) -> None:
        env = dict(os.environ)
        # Children import our packages by module name; make that work from a source checkout too.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
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
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]
