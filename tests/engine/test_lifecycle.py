"""Issue 2, start-up and shutdown: no child process outlives the engine (shutdown, context manager,
SIGKILL of the parent), start-up failures raise the child's error at once, a dead child fails callers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from engine import Engine
from engine.shared.errors import EngineError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = {"temperature": 0, "max_new_tokens": 8}
LONG = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}  # minutes of work on a CPU


def alive(pid: int) -> bool:
    """True while pid runs; a zombie (exited, not yet reaped by whoever adopted it) holds nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def live_children() -> set[int]:
    """Live processes whose parent is this process, read from /proc."""
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                pids.add(int(name))
    return pids


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)


def test_shutdown_leaves_no_child_and_is_idempotent():
    engine = Engine()
    pids, ipc_dir = engine._processes.pids, engine._processes.dir
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    assert engine.generate("Hello", GREEDY)["text"]
    in_flight: list[BaseException] = []

    def wait_on_a_long_request() -> None:
        try:
            engine.generate("Tell me a long story.", LONG)
        except BaseException as exc:
            in_flight.append(exc)

    caller = threading.Thread(target=wait_on_a_long_request)
    caller.start()
    wait_until(lambda: engine.get_server_info()["num_running"] == 1, "the request to run", 60)
    engine.shutdown()
    caller.join(10)
    # A caller still waiting is told, not left hanging.
    assert not caller.is_alive() and isinstance(in_flight[0], EngineError), in_flight
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(ipc_dir)
    assert not engine._loop._thread.is_alive()
    engine.shutdown()  # a second time does nothing, and does not raise
    with pytest.raises(EngineError, match="shut down"):
        engine.generate("Hello", GREEDY)
    with pytest.raises(EngineError, match="shut down"):
        engine.generate("Hello", GREEDY, stream=True)
    with pytest.raises(EngineError, match="shut down"):
        asyncio.run(engine.async_generate("Hello", GREEDY))
    with pytest.raises(EngineError, match="shut down"):
        engine.get_server_info()


def test_context_manager_exit_leaves_no_child():
    held_before_start = [object()]  # what the caller's process holds when the engine starts
    assert any(o is held_before_start for o in gc.get_objects())
    with Engine() as engine:
        # Frozen with the start-up heap: a full collection in this process no longer walks it.
        assert not any(o is held_before_start for o in gc.get_objects())
        pids = engine._processes.pids
        assert all(alive(pid) for pid in pids)
        assert engine.generate("Hello", GREEDY)["text"]
    assert not any(alive(pid) for pid in pids)


def test_children_exit_when_the_parent_is_sigkilled():
    script = (
        "import json, time\n"
        "from engine import Engine\n"
        "engine = Engine()\n"
        "print(json.dumps([engine._processes.pids, engine._processes.dir]), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = parent.stdout.readline()  # the engine is up once its child pids are printed
        pids, ipc_dir = json.loads(line)
        assert len(pids) == 2 and all(alive(pid) for pid in pids) and os.path.isdir(ipc_dir)
    finally:
        parent.kill()  # SIGKILL: no atexit, no shutdown, nothing runs in the parent
        parent.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), "the orphaned children to exit")
    assert not os.path.exists(ipc_dir)  # they clean up what the parent did not live to remove


def test_nonexistent_model_path_raises_at_once():
    before = live_children()
    with pytest.raises(ValueError, match="does not exist"):
        Engine(model_path="/nonexistent/ferry-model")
    assert live_children() == before


@pytest.fixture(params=["no weights", "a weight of the wrong shape"])
def broken_model_dir(request, tmp_path, default_model_path) -> tuple[str, str]:
    """A model folder the frontend accepts (config + tokenizer) but the scheduler cannot load;
    returns (folder, text the scheduler's error must carry). (An architecture ferry lacks is refused
    by the frontend before any process starts: tests/engine/test_model_config.py.)"""
    for name in os.listdir(default_model_path):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(default_model_path, name), tmp_path / name)
    if request.param == "no weights":
        return str(tmp_path), "safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(default_model_path, "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:7].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return str(tmp_path), "model.norm.weight"


def test_scheduler_failure_raises_its_error_from_the_constructor(broken_model_dir, capfd):
    model_dir, error_text = broken_model_dir
    before = live_children()
    # A hang would end at startup_timeout with another message; the child's own error must come first.
    with pytest.raises(EngineError) as raised:
        Engine(model_path=model_dir, startup_timeout=120)
    message = str(raised.value)
    assert "scheduler process failed" in message
    assert error_text in message and "Traceback" in message
    assert live_children() == before
    # Reported once: the traceback is in the exception; the child's own log says one line.
    logged = capfd.readouterr().err
    assert "Traceback" not in logged and "scheduler failed: " in logged


def test_a_dead_scheduler_fails_a_waiting_generate():
    with Engine() as engine:
        scheduler = engine._processes.procs["scheduler"]
        detokenizer_pid = engine._processes.procs["detokenizer"].pid

        def kill_when_running() -> None:
            try:
                wait_until(lambda: engine.get_server_info()["num_running"] == 1, "the request to run", 60)
            finally:
                os.kill(scheduler.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_running)
        killer.start()
        with pytest.raises(EngineError, match="scheduler process exited"):
            engine.generate("Tell me a long story.", LONG)
        killer.join()
        # The engine stays failed and says why, at once, instead of queueing work nobody runs.
        with pytest.raises(EngineError, match="scheduler process exited"):
            engine.generate("Hello", GREEDY)
    assert scheduler.poll() is not None and not alive(detokenizer_pid)
