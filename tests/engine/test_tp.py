"""Issue 11, tensor parallelism on CPU over gloo: tp_size=2 gives tp_size=1's tokens and logprobs (and
HF's tokens), for a model whose one KV head is replicated (Qwen3) and one whose two are split (Llama);
the ranks' shards join into the full weights; no rank outlives the engine (context manager, SIGKILL of
the parent), a dead rank fails the waiting call, and a rank failing at start-up makes the constructor
raise its error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from reference import hf_greedy, tiny_model_dir
from test_lifecycle import PROJECT_ROOT, alive, live_children, wait_until

from engine import Engine
from engine.shared.args import EngineArgs, read_model_config
from engine.shared.errors import EngineError
from scheduler_proc.loader import build_model
from scheduler_proc.tp.group import TPGroup

SMALL = {"max_total_tokens": 4096, "max_running_requests": 8}  # a small KV pool starts fast
LONG = {"temperature": 0, "max_new_tokens": 1000, "ignore_eos": True}  # a minute of decoding on a CPU
KV_LAYOUTS = {"qwen3": {"num_key_value_heads": 1}, "llama": {}}  # 1 KV head: replicated; 2: split


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, default_model_path) -> dict[str, str]:
    return {
        arch: tiny_model_dir(tmp_path_factory.mktemp(arch), arch, default_model_path, **overrides)
        for arch, overrides in KV_LAYOUTS.items()
    }


@pytest.fixture(params=sorted(KV_LAYOUTS))
def model_dir(request, tiny_dirs) -> str:
    return tiny_dirs[request.param]


@pytest.fixture
def llama_dir(tiny_dirs) -> str:
    """The faults need one model: this one."""
    return tiny_dirs["llama"]


def _run(model_dir: str, tp_size: int, prompts: list[list[int]], long_prompt: list[int]) -> list[dict]:
    """Outputs of a greedy batch with logprobs, then of a prompt longer than a prefill chunk (a step
    that needs no logits at all); every process the engine ran is gone after shutdown."""
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    with Engine(model_dir, tp_size=tp_size, **SMALL) as engine:
        outputs = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
        outputs.append(engine.generate(input_ids=long_prompt, sampling_params=params))
        info = engine.get_server_info()
        pids = engine._processes.pids + info["tp_worker_pids"]
        assert info["tp_size"] == tp_size and len(info["rank_memory"]) == tp_size
        assert len(pids) == 2 + tp_size - 1 and all(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in pids), "a process outlived shutdown()"
    return outputs


def test_tp2_equals_tp1_and_hf(model_dir):
    from transformers import AutoModelForCausalLM

    prompts = [[1, 2, 3, 4, 5, 6, 7], [100, 2000, 30], [4242] * 11, [9, 99, 999, 9999, 19, 29]]
    long_prompt = [(37 * i) % 20000 for i in range(700)]  # CPU prefill chunks are 512 tokens
    one = _run(model_dir, 1, prompts, long_prompt)
    two = _run(model_dir, 2, prompts, long_prompt)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, a, b in zip(prompts + [long_prompt], one, two):
        assert b["output_ids"] == a["output_ids"] == hf_greedy(hf, prompt, 24)
        if prompt is long_prompt:
            continue
        for key in ("input_token_logprobs", "output_token_logprobs"):
            xs, ys = a["meta_info"][key], b["meta_info"][key]
            assert len(xs) == len(ys) and [x[1] for x in xs] == [y[1] for y in ys]
            diffs = [abs(x[0] - y[0]) for x, y in zip(xs, ys) if x[0] is not None]
            assert max(diffs) < 1e-4, (key, max(diffs))


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_rank_shards_join_into_the_full_weights(model_dir, load_format):
    """Each rank loads only its slices (safetensors or dummy weights); joined they are the tp_size=1
    model, with the single KV head copied to both ranks when there are fewer KV heads than ranks."""
    config = read_model_config(model_dir)

    def build(rank: int, size: int):
        return build_model(config, load_format, model_dir, torch.float32, torch.device("cpu"), 0, TPGroup(rank, size))

    full = dict(build(0, 1).named_parameters())
    shards = [dict(build(rank, 2).named_parameters()) for rank in range(2)]
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for name, param in full.items():
        parts = [s[name] for s in shards]
        if "qkv_proj" in name:  # per rank: 2 of the 4 query heads, then one KV head for k and for v
            (q0, k0, v0), (q1, k1, v1) = (p.split([2 * head_dim, head_dim, head_dim]) for p in parts)
            if kv_heads == 1:  # fewer KV heads than ranks: both ranks hold the one KV head
                assert torch.equal(k0, k1) and torch.equal(v0, v1), name
                joined = torch.cat([q0, q1, k0, v0])
            else:
                joined = torch.cat([q0, q1, k0, k1, v0, v1])
        elif "gate_up_proj" in name:
            (g0, u0), (g1, u1) = (p.chunk(2) for p in parts)
            joined = torch.cat([g0, g1, u0, u1])
        elif "o_proj" in name or "down_proj" in name:
            joined = torch.cat(parts, dim=1)
        elif "embed_tokens" in name or "lm_head" in name:
            joined = torch.cat(parts)
        else:
            assert torch.equal(parts[0], parts[1]), name
            joined = parts[0]
        assert torch.equal(joined, param), name


def test_a_killed_rank_fails_the_waiting_call_and_leaves_nothing(llama_dir):
    with Engine(llama_dir, tp_size=2, **SMALL) as engine:
        worker = engine.server_info["tp_worker_pids"][0]
        pids = engine._processes.pids + [worker]

        def kill_when_running() -> None:
            try:
                wait_until(lambda: engine.get_server_info()["num_running"] == 1, "the request to run", 60)
            finally:
                os.kill(worker, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_running)
        killer.start()
        with pytest.raises(EngineError, match="tensor-parallel rank 1"):
            engine.generate(input_ids=[1, 2, 3], sampling_params=LONG)
        killer.join()
    wait_until(lambda: not any(alive(pid) for pid in pids), "every rank and child to exit", 5)


def test_every_rank_exits_when_the_parent_is_sigkilled(llama_dir):
    script = (
        "import json, sys, time\n"
        "from engine import Engine\n"
        f"engine = Engine({llama_dir!r}, tp_size=2, max_total_tokens=4096, max_running_requests=8)\n"
        "print(json.dumps(engine._processes.pids + engine.server_info['tp_worker_pids']), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = json.loads(parent.stdout.readline())  # the engine is up once its pids are printed
        assert len(pids) == 3 and all(alive(pid) for pid in pids)
    finally:
        parent.kill()  # SIGKILL: nothing runs in the parent
        parent.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), "the scheduler, detokenizer and rank 1 to exit")


def test_a_rank_failing_at_start_up_raises_its_error(llama_dir, tmp_path):
    """A checkpoint whose embedding lacks the rows rank 1 holds: only rank 1 fails, and its error is
    the one the constructor raises."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name in os.listdir(llama_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(llama_dir, name), tmp_path / name)
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:30000].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    before = live_children()
    with pytest.raises(EngineError) as raised:
        Engine(str(tmp_path), tp_size=2, startup_timeout=120, **SMALL)
    message = str(raised.value)
    assert "tensor-parallel rank 1 process failed" in message, message
    assert "model.embed_tokens.weight" in message and "Traceback" in message
    assert live_children() == before


def test_tp_size_is_validated(llama_dir):
    with pytest.raises(ValueError, match="tp_size"):
        EngineArgs(model_path=llama_dir, tp_size=0).validate()
    with pytest.raises(ValueError, match="tp_size=3"):  # 4 query heads do not split 3 ways
        EngineArgs(model_path=llama_dir, tp_size=3, device="cpu").resolve()
