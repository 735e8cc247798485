"""Weight updates and memory release inside one rank, where the tests can look at the tensors: updates
copy into the parameters' existing storage (what keeps CUDA graphs valid), a refused update writes
nothing, a VL model takes its language part (and tower) under transformers' names, and a release
frees every weight and KV storage and a resume brings back the same values."""

from __future__ import annotations

import pytest
import torch
from reference import tiny_model_dir
from trainer_reference import hf_model, variant_dir
from vlm_reference import tiny_vlm_dir

from engine.shared.args import EngineArgs, read_model_config
from scheduler_proc.loader import build_model
from scheduler_proc.memory_release import MemoryOccupation
from scheduler_proc.model_runner import ModelRunner
from scheduler_proc.tp.group import TPGroup
from scheduler_proc.weight_read import read_weight
from scheduler_proc.weight_update import UpdateRefused, update_from_disk, update_from_tensors


def build(model_dir: str):
    config = read_model_config(model_dir)
    return build_model(config, "auto", model_dir, torch.float32, torch.device("cpu"), 0)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, default_model_path) -> dict[str, str]:
    a = tiny_model_dir(tmp_path_factory.mktemp("a"), "qwen3", default_model_path)
    return {"a": a, "b": variant_dir(a, tmp_path_factory.mktemp("b"), seed=3)}


def test_updates_copy_into_the_existing_storage(dirs):
    model = build(dirs["a"])
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    update_from_tensors(model, list(hf_model(dirs["b"]).state_dict().items()))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == pointers
    want = snapshot(build(dirs["b"]))
    assert all(torch.equal(p, want[name]) for name, p in model.named_parameters())


def test_a_refused_update_writes_nothing(dirs, tmp_path):
    model = build(dirs["a"])
    before = snapshot(model)
    named = list(hf_model(dirs["b"]).state_dict().items()) + [("model.layers.0.self_attn.q_norm.weight", torch.ones(3))]
    with pytest.raises(UpdateRefused, match="q_norm"):
        update_from_tensors(model, named)
    (tmp_path / "config.json").write_text(open(f"{dirs['a']}/config.json").read())
    with pytest.raises(UpdateRefused, match="safetensors"):
        update_from_disk(model, read_model_config(dirs["a"]), str(tmp_path))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_vl_model_takes_its_language_part_under_transformers_names(tmp_path, default_model_path):
    a = tiny_vlm_dir(tmp_path / "a", default_model_path)
    b = variant_dir(a, tmp_path / "b", seed=4)
    model, hf_b = build(a), hf_model(b)
    tower_before = {n: p.clone() for n, p in model.named_parameters() if n.startswith("visual.")}
    language = [(n, t) for n, t in hf_b.state_dict().items() if "visual" not in n]
    assert any(n.startswith("model.language_model.") for n, _ in language)
    update_from_tensors(model, language)
    want = snapshot(build(b))
    for name, param in model.named_parameters():
        assert torch.equal(param, tower_before[name] if name.startswith("visual.") else want[name]), name
    update_from_tensors(model, list(hf_b.state_dict().items()))  # the tower too, its Conv3d kernel flattened
    assert all(torch.equal(p, want[name]) for name, p in model.named_parameters())
    name = "model.language_model.layers.1.self_attn.k_proj.weight"
    assert read_weight(model, TPGroup(), name, 4) == hf_b.get_parameter(name)[:4].tolist()


def test_release_frees_every_storage_and_resume_restores_it(dirs):
    args = EngineArgs(model_path=dirs["a"], device="cpu", max_total_tokens=2048, max_running_requests=4).resolve()
    runner = ModelRunner(args)
    weights = snapshot(runner.model)
    memory = MemoryOccupation(runner)
    memory.release(["weights", "kv_cache"])
    assert memory.holds_requests
    tensors = [*runner.model.parameters(), runner.pool.k_buffer, runner.pool.v_buffer, runner.pool.req_to_token]
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    memory.resume(["weights"])
    assert memory.holds_requests and runner.pool.k_buffer.untyped_storage().nbytes() == 0
    memory.resume(["kv_cache"])
    assert not memory.holds_requests and memory.graphs_wanted
    memory.capture_graphs()  # none on CPU
    assert memory.released == set()
    assert all(torch.equal(p, weights[name]) for name, p in runner.model.named_parameters())
    assert runner.pool.k_buffer.untyped_storage().nbytes() == runner.pool.bytes // 2
