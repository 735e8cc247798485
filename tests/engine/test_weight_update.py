"""Issue 23, the engine inside a trainer (tensor parallelism off; test_weight_update_tp.py has tp_size=2):
an engine on tiny Llama A gives exactly HF model B's greedy ids after each of the three update paths
with B's weights (tensors, disk, the trainer's process group over gloo); a one-tensor update equals HF A
with that tensor replaced; the prefix cache never serves A's KV after an update; bad updates change
nothing; get_weights_by_name reads what HF holds; release/resume keeps outputs and holds requests."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from reference import hf_greedy, tiny_model_dir
from trainer_reference import broadcast_all, free_port, hf_model, trainer_group, variant_dir

from engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 2000, 30], [4242] * 9]
GROUP = "weights-tp1"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_path) -> dict[str, str]:
    a = tiny_model_dir(tmp_path_factory.mktemp("a"), "llama", default_model_path)
    b = variant_dir(a, tmp_path_factory.mktemp("b"), seed=1)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def hf(dirs):
    return {name: hf_model(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def engine(dirs):
    with Engine(dirs["a"], max_total_tokens=4096, max_running_requests=8) as e:
        yield e


@pytest.fixture(scope="module")
def group(engine):
    """The trainer's weight update group, joined by the engine (rank 1 of 2)."""
    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(engine.init_weights_update_group, "127.0.0.1", port, 1, 2, GROUP, "gloo")
        trainer = trainer_group(port, 2, GROUP)
        success, message = joined.result(timeout=120)
    assert success, message
    yield trainer
    import torch.distributed as dist

    dist.destroy_process_group(trainer)


@pytest.fixture
def on_a(engine, dirs):
    """Every test starts from model A's weights."""
    assert engine.update_weights_from_disk(dirs["a"])[0]


def outputs(engine, prompts=PROMPTS) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]


def expected(model, prompts=PROMPTS) -> list[list[int]]:
    return [hf_greedy(model, p, GREEDY["max_new_tokens"]) for p in prompts]


def distributed_update(engine, group, named: list[tuple[str, torch.Tensor]], **kwargs) -> tuple[bool, str]:
    """The trainer broadcasts while the engine's call receives."""
    names, tensors = [n for n, _ in named], [t for _, t in named]
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            engine.update_weights_from_distributed,
            names,
            [t.dtype for t in tensors],
            [list(t.shape) for t in tensors],
            GROUP,
            **kwargs,
        )
        broadcast_all(group, tensors)
        return call.result(timeout=120)


def test_update_from_tensor_gives_model_b(engine, hf, on_a):
    assert outputs(engine) == expected(hf["a"])
    success, message = engine.update_weights_from_tensor(list(hf["b"].state_dict().items()))
    assert success, message
    assert outputs(engine) == expected(hf["b"])


def test_update_from_disk_gives_model_b(engine, hf, dirs, on_a):
    success, message = engine.update_weights_from_disk(dirs["b"])
    assert success and dirs["b"] in message
    assert outputs(engine) == expected(hf["b"])


def test_update_from_distributed_gives_model_b(engine, hf, group, on_a):
    success, message = distributed_update(engine, group, list(hf["b"].state_dict().items()))
    assert success, message
    assert outputs(engine) == expected(hf["b"])


def test_update_from_distributed_in_bfloat16_is_cast(engine, dirs, group, on_a):
    """A trainer's bf16 tensors land in the float32 engine as their float32 values."""
    name = "model.layers.1.mlp.down_proj.weight"
    new = torch.randn(hf_model(dirs["a"]).get_parameter(name).shape).to(torch.bfloat16)
    assert distributed_update(engine, group, [(name, new)])[0]
    assert torch.equal(torch.tensor(engine.get_weights_by_name(name, 1000)), new.float())


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"])
def test_partial_update_equals_hf_with_that_tensor_replaced(engine, dirs, name, on_a):
    model = hf_model(dirs["a"])
    new = torch.randn(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(7)) * 0.3
    with torch.no_grad():
        model.get_parameter(name).copy_(new)
    success, message = engine.update_weights_from_tensor([(name, new)])
    assert success and "1 parameters" in message, message
    assert outputs(engine) == expected(model)


def test_prefix_cache_never_serves_the_old_weights_kv(engine, hf, dirs, on_a):
    prompt = list(range(500, 560))
    engine.generate(input_ids=prompt, sampling_params=GREEDY)  # A's KV of the prompt is cached now
    assert engine.update_weights_from_tensor(list(hf["b"].state_dict().items()))[0]
    again = engine.generate(input_ids=prompt, sampling_params=GREEDY)
    assert again["meta_info"]["cached_tokens"] == 0
    assert again["output_ids"] == hf_greedy(hf["b"], prompt, GREEDY["max_new_tokens"])
    # flush_cache=False keeps what the cache holds (B's KV here), as documented.
    assert engine.update_weights_from_disk(dirs["b"])[0]
    engine.generate(input_ids=prompt, sampling_params=GREEDY)
    assert engine.update_weights_from_tensor(list(hf["b"].state_dict().items()), flush_cache=False)[0]
    assert engine.generate(input_ids=prompt, sampling_params=GREEDY)["meta_info"]["cached_tokens"] > 0


def test_a_running_request_continues_with_the_new_weights(engine, dirs, on_a):
    """Its tokens up to the update are A's greedy ones; from there on the new model's, given all before.
    (The update is one small tensor, a sign-flipped final norm, so it lands long before the end.)"""
    prompt, n, name = [11, 22, 33], 200, "model.norm.weight"
    old, new = hf_model(dirs["a"]), hf_model(dirs["a"])
    with torch.no_grad():
        new.get_parameter(name).neg_()
    stream = engine.generate(input_ids=prompt, sampling_params=GREEDY | {"max_new_tokens": n}, stream=True)
    first = next(stream)
    assert engine.update_weights_from_tensor([(name, new.get_parameter(name))])[0]
    ids = first["output_ids"] + [i for chunk in stream for i in chunk["output_ids"]]
    old_ids = hf_greedy(old, prompt, n)
    split = next(k for k in range(n + 1) if k == n or ids[k] != old_ids[k])
    assert 0 < split < n, "the update should land while the request runs"
    assert ids[split:] == hf_greedy(new, prompt + ids[:split], n - split)


def test_bad_updates_change_nothing(engine, hf, dirs, group, tmp_path, default_model_path, on_a):
    before = outputs(engine)
    good = ("model.layers.0.mlp.up_proj.weight", hf["b"].get_parameter("model.layers.0.mlp.up_proj.weight"))
    shape = hf["a"].get_parameter("model.norm.weight").shape
    cases = {
        "model.layers.0.mlp.nope.weight": [good, ("model.layers.0.mlp.nope.weight", torch.zeros(3))],
        "model.embed_tokens.weight": [good, ("model.embed_tokens.weight", torch.zeros(64, 49152))],
        "torch.int64": [("model.norm.weight", torch.ones(shape, dtype=torch.int64))],
    }
    for needle, named in cases.items():
        success, message = engine.update_weights_from_tensor(named)
        assert not success and needle in message, message
    other = tiny_model_dir(tmp_path, "qwen3", default_model_path)  # another architecture
    for path in (str(tmp_path / "missing"), other):
        success, message = engine.update_weights_from_disk(path)
        assert not success and path in message, message
    success, message = distributed_update(engine, group, [good, ("model.norm.weight", torch.zeros(65))])
    assert not success and "model.norm.weight" in message, message
    assert outputs(engine) == before
    assert distributed_update(engine, group, [good])[0]  # the group is still in step with the trainer


def test_get_weights_by_name_reads_what_hf_holds(engine, hf, on_a):
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "lm_head.weight",
    ]
    for name in names:
        assert engine.get_weights_by_name(name, 5) == hf["a"].get_parameter(name)[:5].tolist(), name
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.get_weights_by_name("model.layers.9.mlp.up_proj.weight")


def test_release_and_resume_keep_outputs_and_hold_requests(engine, hf, on_a):
    """A request running at the release and requests sent while released wait, then finish as if
    nothing had happened; meanwhile the prefix cache is empty and the weights cannot be touched."""
    before = outputs(engine)
    prompt, n = [5, 6, 7], 200
    stream = engine.generate(input_ids=prompt, sampling_params=GREEDY | {"max_new_tokens": n}, stream=True)
    first = next(stream)
    engine.release_memory_occupation()
    info = engine.get_server_info()
    assert info["memory_released"] == ["cuda_graph", "kv_cache", "weights"] and info["kv_cached_tokens"] == 0
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(outputs, engine)
        time.sleep(1.0)
        assert not held.done()
        info = engine.get_server_info()
        assert info["num_waiting"] == 1 + len(PROMPTS) and info["num_running"] == 0
        success, message = engine.update_weights_from_tensor(list(hf["b"].state_dict().items()))
        assert not success and "released" in message
        with pytest.raises(ValueError, match="released"):
            engine.get_weights_by_name("model.norm.weight")
        engine.resume_memory_occupation()
        assert held.result(timeout=120) == before
    ids = first["output_ids"] + [i for chunk in stream for i in chunk["output_ids"]]
    assert ids == hf_greedy(hf["a"], prompt, n)
    assert engine.get_server_info()["memory_released"] == []
    assert outputs(engine) == before


def test_release_and_resume_by_tags(engine, on_a):
    before = outputs(engine)
    engine.release_memory_occupation(["kv_cache"])
    engine.release_memory_occupation(["weights"])
    engine.resume_memory_occupation(["weights"])
    assert engine.get_server_info()["memory_released"] == ["cuda_graph", "kv_cache"]
    engine.resume_memory_occupation(["kv_cache"])  # the graphs come back with the last of the two
    assert engine.get_server_info()["memory_released"] == []
    assert outputs(engine) == before


def test_call_mistakes_raise_in_the_caller(engine):
    with pytest.raises(ValueError, match="load_format"):
        engine.update_weights_from_tensor([], load_format="flattened_bucket")
    with pytest.raises(TypeError, match=r"named_tensors\[0\]"):
        engine.update_weights_from_tensor([("model.norm.weight", [1.0, 2.0])])
    with pytest.raises(TypeError, match="model_path"):
        engine.update_weights_from_disk(None)
    with pytest.raises(ValueError, match="differ in length"):
        engine.update_weights_from_distributed(["a", "b"], ["float32"], [[1]], GROUP)
    with pytest.raises(ValueError, match=r"dtypes\[0\]"):
        engine.update_weights_from_distributed(["a"], ["float99"], [[1]], GROUP)
    with pytest.raises(ValueError, match="nccl"):
        engine.init_weights_update_group("127.0.0.1", 1234, 1, 2, "g")
    with pytest.raises(ValueError, match="world_size"):
        engine.init_weights_update_group("127.0.0.1", 1234, 1, 1, "g", backend="gloo")
    with pytest.raises(ValueError, match="tags"):
        engine.release_memory_occupation(["gpu"])
    assert engine.get_server_info()["memory_released"] == []


def test_a_destroyed_group_refuses_updates_and_its_name_can_be_joined_again(engine, hf, on_a):
    import torch.distributed as dist

    name, good = "weights-again", [("model.norm.weight", hf["b"].get_parameter("model.norm.weight"))]
    for _ in range(2):  # the second join reuses the name of the group the first left
        port = free_port()
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(engine.init_weights_update_group, "127.0.0.1", port, 1, 2, name, "gloo")
            trainer = trainer_group(port, 2, name)
            assert joined.result(timeout=120)[0]
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(engine.update_weights_from_distributed, ["model.norm.weight"], ["float32"], [[64]], name)
            broadcast_all(trainer, [t for _, t in good])
            assert call.result(timeout=120)[0]
        assert engine.destroy_weights_update_group(name) == (True, f"left weight update group {name!r}")
        dist.destroy_process_group(trainer)
        success, message = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], name)
        assert not success and name in message, message
    success, message = engine.destroy_weights_update_group(name)
    assert not success and "no weight update group" in message, message
