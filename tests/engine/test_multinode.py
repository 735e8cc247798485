"""Issue 22, tensor parallelism across machines on CPU: two "nodes" as two process trees on loopback (gloo),
TP=2 split one rank per node, give TP=1's tokens and logprobs; node 1's Engine constructor returns, and
its rank exits, when node 0 shuts down; a rank of node 1 that dies fails node 0's waiting call at once and
node 1's constructor raises; the settings are checked where they are given."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from reference import tiny_model_dir
from test_lifecycle import PROJECT_ROOT, alive, wait_until

from engine import Engine
from engine.shared.args import EngineArgs
from engine.shared.errors import EngineError

SMALL = {"max_total_tokens": 4096, "max_running_requests": 8}
PARAMS = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 2000, 30], [4242] * 11, [9, 99, 999, 9999, 19, 29]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path) -> str:
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", default_model_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _generate(engine: Engine) -> list[dict]:
    return engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True, logprob_start_len=0)


def test_tp2_over_two_nodes_equals_tp1_and_node1_exits_with_node0(model_dir):
    addr = f"127.0.0.1:{_free_port()}"
    node1_script = (
        "from engine import Engine\n"
        f"Engine({model_dir!r}, tp_size=2, nnodes=2, node_rank=1, dist_init_addr={addr!r}, **{SMALL!r})\n"
        "print('node 1 returned', flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    node1 = subprocess.Popen([sys.executable, "-c", node1_script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        with Engine(model_dir, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr, **SMALL) as engine:
            two_nodes = _generate(engine)
            info = engine.get_server_info()
            assert len(info["rank_memory"]) == 2 and info["tp_worker_pids"] == []  # rank 1 is node 1's
            node1_ranks = _children(node1.pid)
            assert len(node1_ranks) == 1 and all(alive(pid) for pid in node1_ranks)
        out, _ = node1.communicate(timeout=30)  # node 0 is gone: node 1's constructor returns
        assert node1.returncode == 0 and "node 1 returned" in out
        wait_until(lambda: not any(alive(pid) for pid in node1_ranks), "node 1's rank to exit", 5)
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    with Engine(model_dir, **SMALL) as engine:
        one = _generate(engine)
    for a, b in zip(one, two_nodes):
        assert b["output_ids"] == a["output_ids"]
        for key in ("input_token_logprobs", "output_token_logprobs"):
            diffs = [abs(x[0] - y[0]) for x, y in zip(a["meta_info"][key], b["meta_info"][key]) if x[0] is not None]
            assert max(diffs) < 1e-4, (key, max(diffs))


def test_a_killed_rank_on_node1_fails_node0s_call_and_node1s_constructor(model_dir):
    addr = f"127.0.0.1:{_free_port()}"
    node1_script = (
        "from engine import Engine\n"
        f"Engine({model_dir!r}, tp_size=2, nnodes=2, node_rank=1, dist_init_addr={addr!r}, **{SMALL!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    node1 = subprocess.Popen([sys.executable, "-c", node1_script], stderr=subprocess.PIPE, text=True, env=env)
    try:
        with Engine(model_dir, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr, **SMALL) as engine:
            assert engine.generate(input_ids=PROMPTS[0], sampling_params=PARAMS)["output_ids"]
            os.kill(_children(node1.pid)[0], signal.SIGKILL)
            with pytest.raises(EngineError, match="tensor-parallel step failed"):
                engine.generate(input_ids=PROMPTS[0], sampling_params={**PARAMS, "max_new_tokens": 1000})
        _, err = node1.communicate(timeout=30)
        assert node1.returncode == 1 and "EngineError: tensor-parallel rank 1 exited" in err, err[-2000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"nnodes": 2, "tp_size": 2}, "dist_init_addr"),
        ({"nnodes": 2, "tp_size": 2, "dist_init_addr": "no-port"}, "dist_init_addr"),
        ({"nnodes": 2, "tp_size": 3, "dist_init_addr": "h:5000"}, "tp_size=3"),
        ({"nnodes": 2, "tp_size": 2, "dist_init_addr": "h:5000", "node_rank": 2}, "node_rank"),
        ({"nnodes": 2, "tp_size": 2, "dist_init_addr": "h:5000", "dp_size": 2}, "dp_size=2"),
        ({"nnodes": 0}, "nnodes"),
    ],
)
def test_multi_node_settings_are_checked(model_dir, settings, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs(model_path=model_dir, **settings).validate()
