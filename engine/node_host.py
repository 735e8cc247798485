"""Tensor parallelism across machines (nnodes > 1, SGLang's names): on a machine with node_rank > 0 the
Engine constructor runs only that machine's tensor-parallel ranks, as worker processes (the same ones
node 0's scheduler starts for its own other ranks), until node 0 shuts down.

The ranks meet node 0's rank 0 at dist_init_addr, where rank 0 holds the group's torch.distributed
store. That store is also how this machine knows node 0 is gone: rank 0 takes it along when it exits,
and a rank waiting for rank 0's next command would otherwise wait for ever. A rank of this machine that
fails takes the others with it; node 0 then finds its collectives failing, and its callers get an error.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import timedelta
from typing import Optional

import zmq

from engine.shared.args import EngineArgs
from engine.shared.child_process import MULTICAST_OFF_ENV
from engine.shared.errors import EngineError
from engine.shared.ipc import Endpoints, pull_socket
from engine.shared.protocol import Codec, ProcessError

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.5
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_node_ranks(args: EngineArgs) -> None:
    """Run this machine's ranks (args.node_ranks()) until node 0 shuts down; raises EngineError with
    the rank's error if one of them fails first (node 0's callers then fail too)."""
    directory = tempfile.mkdtemp(prefix="ferry-node-")  # 0700, as the engine's own
    with open(os.path.join(directory, "args.json"), "w") as f:
        f.write(args.to_json())
    endpoints = Endpoints.in_dir(directory)
    context = zmq.Context()
    errors = pull_socket(context, endpoints.frontend)  # the workers report a failure here
    procs = {rank: _start_worker(directory, rank) for rank in args.node_ranks()}
    logger.info(
        "node %d of %d: ranks %s, meeting node 0 at %s", args.node_rank, args.nnodes, list(procs), args.dist_init_addr
    )
    failure: Optional[str] = None
    try:
        store = _store_client(args)
        logger.info("node %d: joined node 0", args.node_rank)
        failure = _serve_until_done(store, procs, errors)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            proc.wait()
        context.destroy(linger=0)
        shutil.rmtree(directory, ignore_errors=True)
    if failure is not None:
        raise EngineError(failure)


def _start_worker(directory: str, rank: int) -> subprocess.Popen:
    env = dict(os.environ) | MULTICAST_OFF_ENV
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "scheduler_proc.tp.worker_main", directory, str(os.getpid()), str(rank)]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _store_client(args: EngineArgs):
    """A client of rank 0's store (waits for node 0 to make it, up to startup_timeout); counted by
    nobody, so the group's rendezvous is unchanged."""
    import torch.distributed as dist

    host, _, port = args.dist_init_addr.rpartition(":")
    timeout = timedelta(seconds=args.startup_timeout)
    return dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout, wait_for_workers=False)


def _serve_until_done(store, procs: dict[int, subprocess.Popen], errors: zmq.Socket) -> Optional[str]:
    """None once node 0 has shut down; what failed if a rank of this machine failed first."""
    codec = Codec(ProcessError)
    while True:
        failure = None
        if errors.poll(int(1000 * _POLL_SECONDS)):
            error = codec.decode(errors.recv())
            failure = f"{error.role} process failed: {error.message}\n{error.traceback}"
        for rank, proc in procs.items():
            if failure is None and proc.poll() is not None:
                failure = f"tensor-parallel rank {rank} exited with code {proc.returncode}"
        # A rank failing because node 0 went away is no failure here: rank 0's sockets, its store's among
        # them, closed when it exited, before the rank noticed and reported.
        if not _is_up(store):
            logger.info("node 0 has shut down; stopping this node's ranks")
            return None
        if failure is not None:
            return failure


def _is_up(store) -> bool:
    try:
        store.check(["ferry"])  # any call: it fails once rank 0, and its store, are gone
        return True
    except Exception:
        return False
