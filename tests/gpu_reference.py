"""Helpers for GPU parity checks: a ModelRunner on a shipped config with random weights, an HF model
holding the same weights, and prefill logits of every prompt position."""

from __future__ import annotations

import os

import torch

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
TEXTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "To make a cup of tea, you first",
    "The largest planet in our solar system is",
    "In 1492, Christopher Columbus",
    "A triangle has three sides and",
    "The chemical symbol for gold is",
]


def runner_for(name: str, **settings):
    from engine.shared.args import EngineArgs
    from scheduler_proc.model_runner import ModelRunner

    settings = (
        dict(load_format="dummy", device="cuda", context_length=4096, max_running_requests=64, mem_fraction_static=0.5)
        | settings
    )
    args = EngineArgs(model_path=os.path.join(CONFIGS, name), **settings).resolve()
    return ModelRunner(args)


def random_engine(name: str = "qwen2.5-0.5b", **settings):
    """An Engine on a shipped config with random weights, leaving room on the GPU for a second one."""
    from engine import Engine

    settings = dict(load_format="dummy", context_length=4096, mem_fraction_static=0.6) | settings
    return Engine(model_path=os.path.join(CONFIGS, name), **settings)


def hf_copy(runner):
    """An HF model holding exactly the runner's weights (q|k|v and gate|up split back apart)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(runner.args.model_path)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=runner.dtype, attn_implementation="sdpa").eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, param in runner.model.named_parameters():
            if "qkv_proj" in name or "gate_up_proj" in name:
                module = runner.model.get_submodule(name.rsplit(".", 1)[0])
                parts = ["q_proj", "k_proj", "v_proj"] if "qkv_proj" in name else ["gate_proj", "up_proj"]
                for i, part in enumerate(parts):
                    target = name.replace("qkv_proj" if "qkv" in name else "gate_up_proj", part)
                    hf_params[target].copy_(param[module.offsets[i] : module.offsets[i + 1]])
            elif name in hf_params:
                hf_params[name].copy_(param)
        if not config.tie_word_embeddings:
            hf.lm_head.weight.copy_(runner.model.lm_head.weight)
    return hf


def peak_lm_head(runner):
    # Random weights give flat next-token distributions whose top-2 sit within bf16 noise; a sharper
    # head makes "top-1 agreement" measure the kernels, not coin flips between near-ties.
    with torch.no_grad():
        runner.model.lm_head.weight.mul_(4.0)


def prefill_logits(runner, prompts):
    from engine.shared.protocol import GenerateRequest
    from engine.shared.sampling import SamplingParams
    from scheduler_proc.request import Request
    from scheduler_proc.step import build_step

    entries = []
    for i, ids in enumerate(prompts):
        req = Request(
            GenerateRequest(
                rid=str(i),
                input_ids=ids,
                sampling=SamplingParams(max_new_tokens=1),
                return_logprob=True,
                logprob_start_len=0,
            ),
            seed=0,
        )
        req.row = runner.pool.alloc_row()
        entries.append((req, len(ids)))
    step = build_step(entries, runner.pool, [])
    step.batch.logit_rows = torch.arange(sum(len(p) for p in prompts), device="cuda")
    _, logits = runner.forward(step.batch)
    return logits


def greedy_with_logprobs(model_dir: str, prompts: list[list[int]], **settings) -> list[tuple[list[int], list[float]]]:
    """Greedy ids and their logprobs (decode steps: CUDA graphs where the settings allow)."""
    from engine import Engine

    with Engine(model_dir, max_total_tokens=8192, log_level="warning", **settings) as engine:
        outputs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in outputs]


def teacher_forced_logprobs(model_dir: str, sequences: list[list[int]], **settings) -> list[list[float]]:
    """Each token's logprob given the tokens before it, in one prefill per sequence (teacher-forced)."""
    from engine import Engine

    params = {"temperature": 0, "max_new_tokens": 1}
    with Engine(model_dir, max_total_tokens=8192, log_level="warning", **settings) as engine:
        outputs = engine.generate(input_ids=sequences, sampling_params=params, return_logprob=True, logprob_start_len=0)
    return [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"][1:]] for o in outputs]


def mean_logprob_gap(prompts, runs, scores) -> float:
    """Mean |logprob| difference over the generated tokens: as the run decoded them, and as `scores`
    (the reference, teacher-forced over prompt + generated ids) scores the same tokens."""
    gaps = []
    for prompt, (_, logprobs), scored in zip(prompts, runs, scores):
        gaps += [abs(a - b) for a, b in zip(logprobs, scored[len(prompt) - 1 :])]
    return sum(gaps) / len(gaps)


def first_divergence_gaps(a: list[dict], b: list[dict]) -> list[float]:
    """For each pair of runs of one request that differ: the smaller top-2 logprob gap of the two runs at
    the first token where they part (small: a bf16 near-tie that other batch shapes may flip)."""
    gaps = []
    for x, y in zip(a, b):
        at = next((i for i, (s, t) in enumerate(zip(x["output_ids"], y["output_ids"])) if s != t), None)
        if at is not None:
            tops = [o["meta_info"]["output_top_logprobs"][at] for o in (x, y)]
            gaps.append(min(top[0][0] - top[1][0] for top in tops))
    return gaps
