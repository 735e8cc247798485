"""What every child process does around its main loop: args, logging, signals, parent watch, errors."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Optional

import zmq

from engine.shared.args import EngineArgs
from engine.shared.ipc import Endpoints, push_socket, replica_name
from engine.shared.protocol import Codec, ProcessError

logger = logging.getLogger(__name__)

# NVLink multicast stays off in every process (NCCL, torch's symmetric memory, NVSHMEM): on shared
# multi-GPU hosts it can take the GPUs out of service. Set for the children, who pass it on.
MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def child_main(role: str, run: Callable[[EngineArgs, Endpoints, zmq.Context], None]) -> None:
    """Entry point of `python -m <role>_proc <ipc_dir> <parent_pid> [dp_rank]`; never returns normally."""
    dp_rank = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    run_child(role, sys.argv[1], int(sys.argv[2]), run, owns_ipc_dir=True, dp_rank=dp_rank)


def run_child(
    role: str,
    ipc_dir: str,
    parent_pid: int,
    run: Callable[[EngineArgs, Endpoints, zmq.Context], None],
    owns_ipc_dir: bool,
    dp_rank: int = 0,
) -> None:
    """Run a child process's main loop; never returns normally. owns_ipc_dir: a direct child of the
    frontend, which removes the IPC directory if the frontend dies without doing so. dp_rank: the
    scheduler replica the process belongs to (its sockets, its GPUs, its errors' address)."""
    # Ctrl-C in a terminal reaches the whole process group; the frontend decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the frontend's stop) ends us at once, in the kernel. A Python handler would only run
    # when the main thread next runs bytecode, which a blocking zmq recv or a long kernel can delay
    # for seconds (the signal may land on another thread). Set explicitly: a caller that ignores
    # SIGTERM would otherwise pass SIG_IGN on to us.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(parent_pid, ipc_dir if owns_ipc_dir else None)
    context = zmq.Context()
    endpoints = Endpoints.in_dir(ipc_dir, dp_rank)
    try:
        with open(os.path.join(ipc_dir, "args.json")) as f:
            args = EngineArgs.from_json(f.read()).for_replica(dp_rank)
        logging.basicConfig(
            level=args.log_level.upper(),
            format=f"[%(asctime)s {replica_name(role, dp_rank, args.dp_size)}] %(levelname)s %(name)s: %(message)s",
        )
        run(args, endpoints, context)
    except BaseException as exc:  # report anything, then die: the frontend turns it into an exception
        text = traceback.format_exc()
        # One line here: the traceback reaches the caller once, in the EngineError the frontend raises.
        logger.error("%s failed: %s: %s", role, type(exc).__name__, exc)
        report_error(context, endpoints, role, f"{type(exc).__name__}: {exc}", text)
        os._exit(1)
    os._exit(0)


def report_error(context: zmq.Context, endpoints: Endpoints, role: str, message: str, text: str) -> None:
    """Send the frontend a ProcessError; destroys `context` (every socket on it) once it has left."""
    sock = push_socket(context, endpoints.frontend)
    error = ProcessError(role=role, message=message, traceback=text, dp_rank=endpoints.dp_rank)
    sock.send(Codec(ProcessError).encode(error))
    context.destroy(linger=2000)  # closes every socket, letting this message leave first


def watch_parent(parent_pid: int, ipc_dir: Optional[str]) -> None:
    """Exit when the parent process is gone, even if it was SIGKILLed (no orphans holding a GPU),
    removing the IPC directory (when given) that the frontend did not live to remove."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                if ipc_dir is not None:
                    shutil.rmtree(ipc_dir, ignore_errors=True)
                os._exit(1)
            time.sleep(0.25)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def freeze_startup_heap() -> None:
    """Collect start-up's garbage, then move every object left (modules, the model, CUDA graphs, a tokenizer)
    out of the collector's view, for a process about to serve. Unfrozen, a full collection scans them all:
    ~0.2 s a pause over ~400k objects, due every few thousand requests' allocations, while the device waits
    (one fell inside a 2.2 s benchmark run) or, in the frontend, while every caller's submission waits (177
    streamed requests' first tokens 0.3 s late). What is frozen stays alive unless reference counting frees
    it: objects alive now that later end up in a reference cycle are not reclaimed (vLLM and SGLang freeze
    their processes' heaps alike)."""
    gc.collect()
    gc.freeze()
