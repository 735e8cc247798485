"""How an embedding model turns a prompt's hidden states into one vector: read from the folder's
sentence-transformers configuration (modules.json, its Pooling module's config.json, a Normalize module)
when there is one; else the last token's hidden state, L2-normalised (what Qwen3-Embedding's says)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

POOLING_MODES = ("last", "mean", "cls")
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "last"  # "last" token, "mean" over the prompt, or the first ("cls") token
    normalize: bool = True  # L2-normalise the pooled vector


def read_pooling_config(model_dir: str) -> PoolingConfig:
    """The folder's pooling, or the default; ValueError for a sentence-transformers pooling ferry lacks."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(path):
        return PoolingConfig()
    with open(path) as f:
        modules = json.load(f)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    mode = "last"
    if "Pooling" in kinds:
        with open(os.path.join(model_dir, kinds["Pooling"].get("path", ""), "config.json")) as f:
            pooling = json.load(f)
        chosen = [mode for key, mode in _ST_MODES.items() if pooling.get(key)]
        refused = [key for key in _UNSUPPORTED if pooling.get(key)]
        if refused or len(chosen) != 1:
            raise ValueError(
                f"{model_dir}: sentence-transformers pooling {refused or chosen or 'none'} is not supported; "
                f"supported: exactly one of {list(_ST_MODES)}"
            )
        mode = chosen[0]
    return PoolingConfig(mode=mode, normalize="Normalize" in kinds)
