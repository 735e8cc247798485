"""Pooling an embedding request's prompt, chunk by chunk, as the folder's sentence-transformers config says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.shared.pooling import PoolingConfig, read_pooling_config
from engine.shared.protocol import GenerateRequest
from engine.shared.sampling import SamplingParams
from scheduler_proc.pooling import Pooler
from scheduler_proc.request import Request


def _pool(config: PoolingConfig, hidden: torch.Tensor, chunks: list[int]) -> np.ndarray:
    req = Request(
        GenerateRequest(rid="r", input_ids=list(range(len(hidden))), sampling=SamplingParams(), embed=True), 0
    )
    pooler, first = Pooler(config), 0
    for n in chunks:
        assert req.extras is None  # nothing goes out before the prompt is done
        pooler.add(req, hidden[first : first + n], first)
        first += n
    array = req.extras.embedding
    return np.frombuffer(array.data, dtype=array.dtype).reshape(array.shape)


@pytest.mark.parametrize("chunks", [[10], [3, 3, 4], [1] * 10])
def test_pooling_over_chunks_equals_pooling_the_whole_prompt(chunks):
    hidden = torch.randn(10, 6)
    expected = {
        "last": hidden[-1],
        "mean": hidden.mean(0),
        "cls": hidden[0],
    }
    for mode, vector in expected.items():
        got = _pool(PoolingConfig(mode, normalize=False), hidden, chunks)
        np.testing.assert_allclose(got, vector.numpy(), rtol=1e-5, atol=1e-6)
        normed = _pool(PoolingConfig(mode, normalize=True), hidden, chunks)
        np.testing.assert_allclose(normed, torch.nn.functional.normalize(vector, dim=0).numpy(), rtol=1e-5, atol=1e-6)


def _folder(tmp_path, pooling: dict, normalize: bool) -> str:
    tmp_path.mkdir()
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if normalize:
        modules.append({"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(tmp_path)


def test_pooling_config_is_read_from_sentence_transformers_files(tmp_path):
    assert read_pooling_config(str(tmp_path)) == PoolingConfig("last", normalize=True)  # no modules.json
    mean = _folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True}, normalize=False)
    assert read_pooling_config(mean) == PoolingConfig("mean", normalize=False)
    cls = _folder(tmp_path / "cls", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, True)
    assert read_pooling_config(cls) == PoolingConfig("cls", normalize=True)
    weighted = _folder(tmp_path / "max", {"pooling_mode_max_tokens": True}, normalize=True)
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        read_pooling_config(weighted)
