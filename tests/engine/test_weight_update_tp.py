"""Issue 23 at tp_size=2 over gloo, on a tiny Qwen2 (q/k/v biases, one KV head that both ranks hold):
each update path with model B's weights gives HF B's greedy ids, every rank taking its shard, and the
prefix cache serves none of A's KV after it; a partial
update of a replicated KV projection and a row-parallel weight equals HF with them replaced; weights
read back join the ranks' shards; bad updates change nothing on any rank; release/resume keeps outputs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from reference import hf_greedy, tiny_model_dir
from trainer_reference import broadcast_all, free_port, hf_model, trainer_group, variant_dir

from engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [4242] * 9]
GROUP = "weights-tp2"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_path) -> dict[str, str]:
    a = tiny_model_dir(tmp_path_factory.mktemp("a"), "qwen2", default_model_path, num_key_value_heads=1)
    return {"a": a, "b": variant_dir(a, tmp_path_factory.mktemp("b"), seed=2)}


@pytest.fixture(scope="module")
def hf(dirs):
    return {name: hf_model(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def engine(dirs):
    with Engine(dirs["a"], tp_size=2, max_total_tokens=4096, max_running_requests=8) as e:
        yield e


@pytest.fixture(scope="module")
def group(engine):
    """The trainer's group: the trainer (rank 0) and the engine's two ranks (1 and 2)."""
    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(engine.init_weights_update_group, "127.0.0.1", port, 1, 3, GROUP, "gloo")
        trainer = trainer_group(port, 3, GROUP)
        success, message = joined.result(timeout=120)
    assert success and "rank 1 of 3" in message, message
    yield trainer
    import torch.distributed as dist

    dist.destroy_process_group(trainer)


@pytest.fixture
def on_a(engine, dirs):
    assert engine.update_weights_from_disk(dirs["a"])[0]


def outputs(engine) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def expected(model) -> list[list[int]]:
    return [hf_greedy(model, p, GREEDY["max_new_tokens"]) for p in PROMPTS]


def distributed_update(engine, group, named: list[tuple[str, torch.Tensor]]) -> tuple[bool, str]:
    names, tensors = [n for n, _ in named], [t for _, t in named]
    dtypes, shapes = [t.dtype for t in tensors], [list(t.shape) for t in tensors]
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(engine.update_weights_from_distributed, names, dtypes, shapes, GROUP)
        broadcast_all(group, tensors)
        return call.result(timeout=120)


def test_update_from_tensor_gives_model_b_with_no_kv_of_a(engine, hf, on_a):
    assert outputs(engine) == expected(hf["a"])  # the prompts' KV under A is cached now
    success, message = engine.update_weights_from_tensor(list(hf["b"].state_dict().items()))
    assert success, message
    results = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [r["meta_info"]["cached_tokens"] for r in results] == [0] * len(PROMPTS)
    assert [r["output_ids"] for r in results] == expected(hf["b"])


def test_update_from_disk_gives_model_b(engine, hf, dirs, on_a):
    assert engine.update_weights_from_disk(dirs["b"])[0]
    assert outputs(engine) == expected(hf["b"])


def test_update_from_distributed_gives_model_b(engine, hf, group, on_a):
    success, message = distributed_update(engine, group, list(hf["b"].state_dict().items()))
    assert success, message
    assert outputs(engine) == expected(hf["b"])


def test_partial_update_of_sharded_and_replicated_weights(engine, dirs, on_a):
    model = hf_model(dirs["a"])
    generator = torch.Generator().manual_seed(3)
    named = []
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        new = torch.randn(model.get_parameter(name).shape, generator=generator) * 0.3
        with torch.no_grad():
            model.get_parameter(name).copy_(new)
        named.append((name, new))
    assert engine.update_weights_from_tensor(named)[0]
    assert outputs(engine) == expected(model)


def test_weights_read_back_join_the_ranks_shards(engine, hf, on_a):
    for name, param in hf["a"].named_parameters():
        assert engine.get_weights_by_name(name, 3) == param[:3].tolist(), name


def test_bad_updates_change_nothing_on_any_rank(engine, hf, group, on_a):
    before = outputs(engine)
    good = ("model.layers.0.mlp.up_proj.weight", hf["b"].get_parameter("model.layers.0.mlp.up_proj.weight"))
    success, message = engine.update_weights_from_tensor(
        [good, ("model.layers.0.self_attn.k_proj.bias", torch.ones(7))]
    )
    assert not success and "model.layers.0.self_attn.k_proj.bias" in message
    success, message = distributed_update(engine, group, [good, ("lm_head.bias", torch.zeros(3))])
    assert not success and "lm_head.bias" in message
    assert outputs(engine) == before


def test_release_and_resume_keep_outputs(engine, on_a):
    before = outputs(engine)
    engine.release_memory_occupation()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(outputs, engine)
        time.sleep(0.5)
        assert not held.done()
        engine.resume_memory_occupation()
        assert held.result(timeout=120) == before
