"""Issue 22, Ray Data: engine.ray.LLMPredictor over a local Ray cluster (two CPUs) with two actors, one
Engine each, gives the texts one engine gives, row for row; both actors take rows; a batch without a
prompt or input_ids column is refused naming the columns. Skipped when ray is not installed."""

from __future__ import annotations

import os

import pytest
from reference import tiny_model_dir
from test_lifecycle import PROJECT_ROOT

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from engine import Engine  # noqa: E402
from engine.ray import LLMPredictor, map_llm  # noqa: E402

SETTINGS = {"max_total_tokens": 4096, "max_running_requests": 8, "device": "cpu"}
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [f"Prompt number {i}: once upon a time" for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path) -> str:
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", default_model_path)


@pytest.fixture(scope="module")
def cluster():
    # The actors import ferry (and this module's PidPredictor) by name: they need our folders on their path.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([PROJECT_ROOT, here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        log_to_driver=False,
    )
    yield
    ray.shutdown()


class PidPredictor(LLMPredictor):
    """LLMPredictor that also says which actor process served each row."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["actor_pid"] = [os.getpid()] * len(out["generated_text"])
        return out


def test_two_actors_give_one_engines_texts(cluster, model_dir):
    with Engine(model_dir, **SETTINGS) as engine:
        expected = [out["text"] for out in engine.generate(PROMPTS, GREEDY)]
    # Both actors up before the first batch, one batch each at a time: both take rows, however slowly
    # one of them starts. (A dataset keeps the context it was made in: set before making it.)
    ray.data.DataContext.get_current().wait_for_min_actors_s = 300
    dataset = ray.data.from_items([{"prompt": p} for p in PROMPTS])
    rows = dataset.map_batches(
        PidPredictor,
        fn_constructor_kwargs={"model_path": model_dir, "sampling_params": GREEDY, **SETTINGS},
        compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1),
        num_cpus=0.5,  # the engine's own processes do the work; two actors fit the two CPUs
        batch_size=2,
    ).take_all()
    texts = {row["prompt"]: row["generated_text"] for row in rows}
    assert [texts[p] for p in PROMPTS] == expected
    assert all(row["num_output_tokens"] == 12 for row in rows)
    assert len({row["actor_pid"] for row in rows}) == 2  # both actors took rows


def test_map_llm_takes_input_ids(cluster, model_dir):
    ids = [[1, 2, 3, 4], [100, 200, 300], [7] * 9]
    with Engine(model_dir, **SETTINGS) as engine:
        expected = [out["text"] for out in engine.generate(input_ids=ids, sampling_params=GREEDY)]
    dataset = ray.data.from_items([{"input_ids": x, "row": i} for i, x in enumerate(ids)])
    rows = map_llm(dataset, concurrency=1, batch_size=3, sampling_params=GREEDY, model_path=model_dir, **SETTINGS)
    texts = {row["row"]: row["generated_text"] for row in rows.take_all()}
    assert [texts[i] for i in range(len(ids))] == expected


def test_a_batch_without_prompts_is_refused(model_dir):
    predictor = LLMPredictor(model_dir, GREEDY, **SETTINGS)
    try:
        with pytest.raises(ValueError, match="'prompt' or an 'input_ids' column.*'text'"):
            predictor({"text": ["hello"]})
        import pandas as pd

        out = predictor(pd.DataFrame({"prompt": PROMPTS[:2]}))
        assert list(out.columns) == ["prompt", "generated_text", "num_output_tokens"]
    finally:
        predictor.shutdown()
