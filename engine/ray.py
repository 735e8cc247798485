"""Batch generation over a Ray cluster with Ray Data: `LLMPredictor` is a callable class for
`Dataset.map_batches`, so Ray starts one Engine per actor (once) and streams the dataset's batches through
them. Ray is an optional extra (`pip install -e .[ray]`); this is the only module that imports it.

    import ray
    from engine.ray import LLMPredictor

    ds = ray.data.read_parquet("s3://bucket/prompts/")                  # a "prompt" (or "input_ids") column
    ds = ds.map_batches(
        LLMPredictor,
        fn_constructor_kwargs={"model_path": "/models/Qwen2.5-7B-Instruct", "tp_size": 1,
                               "sampling_params": {"temperature": 0, "max_new_tokens": 256}},
        compute=ray.data.ActorPoolStrategy(size=8),  # 8 actors, one Engine each (older Ray: concurrency=8)
        num_gpus=1,             # per actor: tp_size * dp_size
        batch_size=256,         # rows per call; the engine batches them itself
    )
    ds.write_parquet("s3://bucket/generations/")                       # + generated_text, num_output_tokens

`map_llm(ds, ...)` does the same with num_gpus worked out from the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import ray.data

    from engine.engine import Engine


class LLMPredictor:
    """One Engine per Ray actor. `LLMPredictor(model_path=None, sampling_params=None, **settings)`: the
    settings are Engine's (tp_size, dp_size, dtype, context_length, ...), sampling_params the
    generate() sampling parameters every row gets.

    Each call takes a batch with a `prompt` column (str) or an `input_ids` column (lists of token ids),
    as a dict of columns (Ray Data's default numpy batches) or a pandas DataFrame, and returns it with
    `generated_text` and `num_output_tokens` added, row for row."""

    def __init__(
        self, model_path: Optional[str] = None, sampling_params: Optional[dict[str, Any]] = None, **settings: Any
    ) -> None:
        from engine.engine import Engine

        if sampling_params is not None and not isinstance(sampling_params, Mapping):
            raise TypeError(f"sampling_params must be a dict of SamplingParams fields, got {sampling_params!r}")
        self.sampling_params = dict(sampling_params or {})
        settings.setdefault("log_level", "warning")  # one actor per engine: keep the workers' logs short
        self.engine: Engine = Engine(model_path, **settings)

    def __call__(self, batch: Any) -> Any:
        columns = list(batch.columns) if hasattr(batch, "columns") else list(batch)
        if "prompt" in columns:
            prompts = [str(prompt) for prompt in batch["prompt"]]
            outputs = self.engine.generate(prompts, self.sampling_params, use_tqdm=False) if prompts else []
        elif "input_ids" in columns:
            input_ids = [[int(t) for t in ids] for ids in batch["input_ids"]]
            outputs = self.engine.generate(None, self.sampling_params, input_ids, use_tqdm=False) if input_ids else []
        else:
            raise ValueError(f"LLMPredictor needs a 'prompt' or an 'input_ids' column; the batch has {columns}")
        return _with_outputs(batch, outputs)

    def shutdown(self) -> None:
        """Stop this actor's engine (Ray also does, when the actor ends)."""
        self.engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def map_llm(
    dataset: ray.data.Dataset,
    *,
    concurrency: int,
    batch_size: int,
    sampling_params: Optional[dict[str, Any]] = None,
    **settings: Any,
) -> ray.data.Dataset:
    """`dataset.map_batches(LLMPredictor, ...)` with `concurrency` actors of one Engine each (Engine
    `settings`), each asking Ray for the GPUs its engine uses (tp_size * dp_size; none on the CPU)."""
    import ray.data

    gpus = 0 if settings.get("device") == "cpu" else settings.get("tp_size", 1) * settings.get("dp_size", 1)
    return dataset.map_batches(
        LLMPredictor,
        fn_constructor_kwargs={"sampling_params": sampling_params, **settings},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        num_gpus=gpus,
    )


def _with_outputs(batch: Any, outputs: list[dict[str, Any]]) -> Any:
    import numpy as np

    texts = np.array([out["text"] for out in outputs], dtype=object)
    counts = np.array([out["meta_info"]["completion_tokens"] for out in outputs], dtype=np.int64)
    if hasattr(batch, "columns"):  # a pandas DataFrame
        return batch.assign(generated_text=texts, num_output_tokens=counts)
    return {**batch, "generated_text": texts, "num_output_tokens": counts}
