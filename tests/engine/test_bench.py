"""The benchmark harness runs on CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json

import pytest

from engine.bench import main, make_workloads, parse_args, time_one
from engine.bench_workloads import NAMED, nanovllm


def test_named_workloads_are_the_published_ones():
    work = nanovllm()
    assert len(work.input_ids) == 256
    assert work.input_tokens == 142827 and work.output_tokens == 133966  # PERF_ANCHORS' counts
    assert {"nanovllm", "512x256", "decode-heavy", "sgl-random", "prefix"} <= set(NAMED)


def test_harness_runs_and_writes_a_json_line(tmp_path, capsys):
    result_file = tmp_path / "out.jsonl"
    main(
        [
            "--num-prompts",
            "3",
            "--random-input-len",
            "12",
            "--random-output-len",
            "4",
            "--device",
            "cpu",
            "--max-total-tokens",
            "2048",
            "--result-file",
            str(result_file),
        ]
    )
    row = json.loads(result_file.read_text().splitlines()[-1])
    assert row["num_prompts"] == 3
    assert row["ferry"]["output_tokens"] == row["requested_output_tokens"]  # ignore_eos by default
    assert row["ferry"]["output_tok_s"] > 0
    assert row["engine_settings"] == {"device": "cpu", "max_total_tokens": 2048}
    assert "output tok/s" in capsys.readouterr().out


def test_one_engine_times_several_workloads_each_from_an_empty_prefix_cache():
    from engine import Engine

    args, settings = parse_args(["--num-prompts", "2", "--random-input-len", "40", "--random-output-len", "3"])
    [work] = make_workloads(args)
    with Engine(device="cpu", max_total_tokens=2048) as engine:
        first, again = (time_one(engine, work, args, settings)["ferry"] for _ in range(2))
    # The same prompts again: without the flush before each run, all but their last tokens come from the cache.
    assert first["cached_tokens"] == again["cached_tokens"] == 0
    assert first["output_tokens"] == again["output_tokens"] == 6


def test_workload_names_are_checked():
    assert parse_args(["--workload", "nanovllm,512x256"])[0].workload == ["nanovllm", "512x256"]
    with pytest.raises(SystemExit):
        parse_args(["--workload", "nanovllm,bogus"])


def test_the_floor_of_a_mixture_of_experts_counts_the_experts_a_step_reads():
    import os

    from engine.bench_roofline import model_params
    from engine.shared.args import read_model_config

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    moe = read_model_config(os.path.join(configs, "qwen3-30b-a3b"))
    total, read_one, active = model_params(moe, batch=1)
    assert round(total / 1e9, 1) == 30.5 and round(active / 1e9, 2) == 3.35  # Qwen3-30B-A3B's published sizes
    assert read_one == active  # one token reads its own experts only
    assert active < model_params(moe, batch=8)[1] < total and abs(model_params(moe, 256)[1] - total) < 1e6
    dense = read_model_config(os.path.join(configs, "llama-3.1-8b"))
    assert len(set(model_params(dense, batch=64))) == 1  # a dense model reads and computes with all of it
