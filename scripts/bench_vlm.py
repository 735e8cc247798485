"""Vision-language inference on the device, in one run: checks, then ferry's throughput against HF
transformers `generate` on Qwen2.5-VL-7B (public architecture numbers, random bf16 weights).

Checks (a tiny random Qwen2.5-VL built with transformers, four prompts: one image, two images, an image
of another size, text only): ferry float32 (torch attention, 5-token chunks cutting through images)
equals HF float32 greedy ids; ferry bf16 with flashinfer and CUDA-graph decode equals itself without
graphs.

Throughput: N prompts, each with its own 448x448 random image, 128 new tokens, ignore_eos, greedy.
ferry's time runs from the generate() call (image preprocessing included) to the last output. HF runs
on the first --hf-prompts of the same prompts in padded batches of --hf-batch-size (preprocessing
included too); both are output tokens per second, so a subset counts fairly. Prints a table and
appends one JSON line to --result-file.

Device: python scripts/bench_vlm.py            CPU smoke: python scripts/bench_vlm.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from vlm_reference import (  # noqa: E402
    PLACEHOLDER,
    VISION_TOKENS,
    expand,
    hf_vlm_greedy,
    image_processor,
    random_image,
    tiny_vlm_dir,
    vlm_tokenizer,
)

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, in its released (flat) layout; token ids come from our tokenizer.
QWEN2_5_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-prompts", type=int, default=128, help="HF runs the first this many prompts")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--skip-checks", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU: the tiny model, a few small prompts")
    p.add_argument("--result-file", default=os.path.join(os.environ.get("OUT", "."), "bench_vlm.jsonl"))
    return p.parse_args()


def tokenizer_dir() -> str:
    from engine.shared.model_files import resolve_model_path

    return resolve_model_path(None)


def build_7b_dir(out: str) -> str:
    """A config-only Qwen2.5-VL-7B folder with the default tokenizer plus Qwen's vision tokens."""
    tokenizer = vlm_tokenizer(tokenizer_dir())
    start, pad, end, video = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    config = dict(
        QWEN2_5_VL_7B,
        vision_start_token_id=start,
        image_token_id=pad,
        vision_end_token_id=end,
        video_token_id=video,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer.save_pretrained(out)
    return out


# ---- checks ----


def device_checks(work: str) -> dict[str, Any]:
    """ferry against HF on a tiny model: exact in float32, and CUDA-graph decode against eager in bf16."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from engine import Engine

    tiny = tiny_vlm_dir(os.path.join(work, "tiny"), tokenizer_dir(), head_dim=64)  # flashinfer's smallest
    a, b, c = random_image(56, 56, 1), random_image(84, 112, 2), random_image(112, 84, 3)
    cases = [
        (f"What is in {PLACEHOLDER}?", [a]),
        (f"Compare {PLACEHOLDER} with {PLACEHOLDER}.", [a, b]),
        (f"{PLACEHOLDER} Describe it.", [c]),
        ("Tell me about the sea.", []),
    ]
    prompts = [f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n" for text, _ in cases]
    image_data = [images or None for _, images in cases]
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    reference = [hf_vlm_greedy(hf, tokenizer, p, images, 16) for p, (_, images) in zip(prompts, cases)]
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {}
    with Engine(tiny, dtype="float32", attention_backend="torch", chunked_prefill_size=5, device=device) as e:
        batch = [o["output_ids"] for o in e.generate(prompts, params, image_data=image_data)]
        alone = [e.generate(p, params, image_data=d)["output_ids"] for p, d in zip(prompts, image_data)]
    results["fp32_chunked_equals_hf"] = batch == reference and alone == reference
    if device == "cuda":
        runs = {}
        for graphs in (True, False):
            with Engine(tiny, dtype="bfloat16", disable_cuda_graph=not graphs, cuda_graph_max_bs=16) as e:
                runs[graphs] = [o["output_ids"] for o in e.generate(prompts, params, image_data=image_data)]
                results.setdefault("bf16_cuda_graph_sizes", e.get_server_info()["cuda_graph_batch_sizes"])
        same = sum(x == y for r, s in zip(runs[True], runs[False]) for x, y in zip(r, s))
        results["bf16_graph_vs_eager_token_agreement"] = same / sum(len(r) for r in runs[False])
        hf_same = sum(x == y for r, s in zip(runs[True], reference) for x, y in zip(r, s))
        results["bf16_vs_hf_fp32_token_agreement"] = hf_same / sum(len(r) for r in reference)
    return results


# ---- throughput ----


def workload(n: int, size: int) -> tuple[list[str], list[Any]]:
    prompts = [
        f"<|im_start|>user\n{PLACEHOLDER}Describe picture {i} in detail.<|im_end|>\n<|im_start|>assistant\n"
        for i in range(n)
    ]
    return prompts, [random_image(size, size, seed=100 + i) for i in range(n)]


def run_ferry(model_dir: str, prompts: list[str], images: list[Any], output_len: int, smoke: bool) -> dict[str, Any]:
    from engine import Engine

    settings: dict[str, Any] = {"context_length": 4096}
    if not smoke:
        settings |= {"load_format": "dummy", "mem_fraction_static": 0.8}
    params = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
    with Engine(model_dir, **settings) as engine:
        engine.generate(prompts[:4], dict(params, max_new_tokens=4), image_data=images[:4])  # warm-up (JIT, caches)
        engine.flush_cache()
        start = time.perf_counter()
        outs = engine.generate(prompts, params, image_data=images)
        wall = time.perf_counter() - start
        info = engine.get_server_info()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {
        "prompts": len(prompts),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "prompt_tokens": outs[0]["meta_info"]["prompt_tokens"],
        "device_name": info["device_name"],
        "cuda_graph_batch_sizes": len(info["cuda_graph_batch_sizes"]),
    }


def run_hf(
    model_dir: str, prompts: list[str], images: list[Any], output_len: int, batch_size: int, smoke: bool
) -> dict[str, Any]:
    import inspect

    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if smoke:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(
                AutoConfig.from_pretrained(model_dir), dtype=dtype, attn_implementation="sdpa"
            )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    takes_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        inputs = _hf_batch(
            tokenizer,
            model.config.image_token_id,
            prompts[first : first + batch_size],
            images[first : first + batch_size],
            takes_types,
        )
        with torch.inference_mode():
            model.generate(
                **{k: v.to(device) for k, v in inputs.items()},
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
            )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = len(prompts) * output_len
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {
        "prompts": len(prompts),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "batch_size": batch_size,
    }


def _hf_batch(tokenizer, image_token_id: int, prompts: list[str], images: list[Any], takes_types: bool) -> dict:
    from engine.bench_hf import left_pad

    processed = image_processor()(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"].tolist()
    rows = [expand(tokenizer(p)["input_ids"], grids[i : i + 1], image_token_id) for i, p in enumerate(prompts)]
    ids, mask = left_pad(rows)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": processed["pixel_values"],
        "image_grid_thw": processed["image_grid_thw"],
    }
    if takes_types:  # transformers 5 places M-RoPE by these
        batch["mm_token_type_ids"] = (ids == image_token_id).int()
    return batch


# ---- report ----


def report(args: argparse.Namespace, checks: dict[str, Any], ferry: dict[str, Any], hf: dict[str, Any]) -> None:
    print("\n| check | result |\n|---|---|")
    for name, value in checks.items():
        print(f"| {name} | {value:.2%} |" if isinstance(value, float) else f"| {name} | {value} |")
    model = "tiny Qwen2.5-VL (smoke run)" if args.smoke else "Qwen2.5-VL-7B (dummy bf16 weights)"
    print(
        f"\n{model} on {ferry['device_name']}: {args.image_size}x{args.image_size} images "
        f"({ferry['prompt_tokens']} prompt tokens each), {args.output_len} new tokens, ignore_eos, "
        "greedy"
    )
    print("\n| system | prompts | output tokens | wall s | output tok/s |\n|---|---|---|---|---|")
    for name, r in (("ferry", ferry), (f"HF generate (batch {hf['batch_size']})", hf)):
        print(f"| {name} | {r['prompts']} | {r['output_tokens']} | {r['wall_s']:.1f} | {r['output_tok_s']:,.0f} |")
    ratio = ferry["output_tok_s"] / hf["output_tok_s"]
    print(f"\nferry / HF: {ratio:.1f}x (target >= 5x)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    line = {
        "bench": "vlm",
        "model": "qwen2.5-vl-7b",
        "num_prompts": args.num_prompts,
        "image_size": args.image_size,
        "output_len": args.output_len,
        "ferry": ferry,
        "hf": hf,
        "ratio": ratio,
        "checks": checks,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit or None,
    }
    with open(args.result_file, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"appended to {args.result_file}")


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.num_prompts, args.image_size, args.output_len = 4, 56, 4
        args.hf_prompts, args.hf_batch_size = 2, 2
    work = tempfile.mkdtemp(prefix="ferry-vlm-")
    checks = {} if args.skip_checks else device_checks(work)
    print(json.dumps(checks), flush=True)
    model_dir = (
        tiny_vlm_dir(os.path.join(work, "model"), tokenizer_dir())
        if args.smoke
        else build_7b_dir(os.path.join(work, "qwen2.5-vl-7b"))
    )
    prompts, images = workload(args.num_prompts, args.image_size)
    ferry = run_ferry(model_dir, prompts, images, args.output_len, args.smoke)
    print(json.dumps(ferry), flush=True)
    n = min(args.hf_prompts, args.num_prompts)
    hf = run_hf(model_dir, prompts[:n], images[:n], args.output_len, args.hf_batch_size, args.smoke)
    report(args, checks, ferry, hf)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
