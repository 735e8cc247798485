"""What every child process does around its main loop: args, logging, signals, parent watch, errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from typing import Callable

import zmq

from engine.args import EngineArgs
from engine.ipc import Endpoints, push_socket
from engine.protocol import Codec, ProcessError

logger = logging.getLogger(__name__)


def child_main(role: str, run: Callable[[EngineArgs, Endpoints, zmq.Context], None]) -> None:
    """Entry point of `python -m <role>_proc <ipc_dir> <parent_pid>`; never returns normally."""
    ipc_dir, parent_pid = sys.argv[1], int(sys.argv[2])
    # Ctrl-C in a terminal reaches the whole process group; the frontend decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the frontend's stop) ends us at once, in the kernel. A Python handler would only run
    # when the main thread next runs bytecode, which a blocking zmq recv or a long kernel can delay
    # for seconds (the signal may land on another thread). Set explicitly: a caller that ignores
    # SIGTERM would otherwise pass SIG_IGN on to us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _watch_parent(parent_pid, ipc_dir)
    context = zmq.Context()
    endpoints = Endpoints.in_dir(ipc_dir)
    try:
        with open(os.path.join(ipc_dir, "args.json")) as f:
            args = EngineArgs.from_json(f.read())
        logging.basicConfig(
            level=args.log_level.upper(),
            format=f"[%(asctime)s {role}] %(levelname)s %(name)s: %(message)s",
        )
        run(args, endpoints, context)
    except BaseException as exc:  # report anything, then die: the frontend turns it into an exception
        text = traceback.format_exc()
        logger.error("%s failed: %s", role, text)
        _report_error(context, endpoints, role, f"{type(exc).__name__}: {exc}", text)
        os._exit(1)
    os._exit(0)


def _report_error(context: zmq.Context, endpoints: Endpoints, role: str, message: str, text: str) -> None:
    sock = push_socket(context, endpoints.frontend)
    sock.send(Codec(ProcessError).encode(ProcessError(role=role, message=message, traceback=text)))
    context.destroy(linger=2000)  # closes every socket, letting this message leave first


def _watch_parent(parent_pid: int, ipc_dir: str) -> None:
    """Exit when the frontend process is gone, even if it was SIGKILLed (no orphans holding a GPU),
    removing the IPC directory that the frontend did not live to remove."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                shutil.rmtree(ipc_dir, ignore_errors=True)
                os._exit(1)
            time.sleep(0.25)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
