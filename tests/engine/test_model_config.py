"""Issue 20: a model ferry would run wrongly is refused at start-up, naming what is wrong and listing what is
supported; and the sliding window of each layer is read from config.json as HF transformers reads it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_lifecycle import live_children

from engine import Engine
from engine.shared.model_config import ARCHITECTURES, check_model_config, layer_windows


def _config(arch: str, **extra) -> dict:
    act = "gelu_pytorch_tanh" if arch.startswith("Gemma") else "silu"
    return {"architectures": [arch], "num_hidden_layers": 6, "hidden_act": act, **extra}


def test_an_unsupported_architecture_is_refused_before_any_process_starts(tmp_path, default_model_path):
    for name in os.listdir(default_model_path):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(default_model_path, name), tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = live_children()
    with pytest.raises(ValueError, match="'DeepseekV3ForCausalLM' is not supported") as raised:
        Engine(model_path=str(tmp_path))
    assert all(arch in str(raised.value) for arch in ARCHITECTURES)
    assert live_children() == before


@pytest.mark.parametrize(
    "config, words",
    [
        (_config("LlamaForCausalLM", rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["'yarn'", "llama3"]),
        (_config("Qwen3ForCausalLM", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6}), ["'dynamic'"]),
        (_config("MistralForCausalLM", rope_scaling={"type": "longrope"}), ["'longrope'"]),  # Phi-3's alone
        (_config("LlamaForCausalLM", hidden_act="gelu"), ["activation 'gelu'", "silu"]),
        (_config("Gemma2ForCausalLM", hidden_activation="gelu"), ["activation 'gelu'", "gelu_pytorch_tanh"]),
        (_config("Qwen2ForCausalLM", quantization_config={"quant_method": "awq"}), ["quantized", "'awq'"]),
        (_config("Gemma3ForCausalLM", layer_types=["chunked_attention"] * 6), ["'chunked_attention'"]),
        (_config("Gemma3ForCausalLM", use_bidirectional_attention=True), ["use_bidirectional_attention"]),
        (_config("Phi3ForCausalLM", rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.75}), ["0.75"]),
        (_config("MistralForCausalLM", sliding_window=0), ["sliding_window", "positive"]),
    ],
)
def test_a_setting_ferry_would_ignore_is_refused(config, words):
    with pytest.raises(ValueError) as raised:
        check_model_config(config)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert config["architectures"][0] in str(raised.value)


def test_gemma3_rope_per_layer_type_is_accepted():
    params = {"full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}
    check_model_config(_config("Gemma3ForCausalLM", rope_parameters=params))


@pytest.mark.parametrize(
    "config, expected",
    [
        (_config("MistralForCausalLM", sliding_window=4096), [4096] * 6),
        (_config("MistralForCausalLM", sliding_window=None), [None] * 6),
        (_config("LlamaForCausalLM", sliding_window=4096), [None] * 6),  # HF's Llama has no window
        (_config("Phi3ForCausalLM", sliding_window=2047), [2047] * 6),
        (_config("Gemma2ForCausalLM", sliding_window=8), [8, None] * 3),
        (_config("Gemma3ForCausalLM", sliding_window=8), [8] * 5 + [None]),
        (_config("Gemma3ForCausalLM", sliding_window=8, sliding_window_pattern=3), [8, 8, None] * 2),
        (_config("Qwen2ForCausalLM", sliding_window=32, max_window_layers=4), [None] * 6),  # use_sliding_window off
        (
            _config("Qwen2ForCausalLM", sliding_window=32, max_window_layers=4, use_sliding_window=True),
            [None] * 4 + [32] * 2,
        ),
        (_config("Qwen3MoeForCausalLM", sliding_window=32, use_sliding_window=True), [32] * 6),
        (
            _config("MistralForCausalLM", sliding_window=5, layer_types=["full_attention", "sliding_attention"] * 3),
            [None, 5] * 3,
        ),
    ],
)
def test_layer_windows_follow_hf(config, expected):
    assert layer_windows(config) == expected
