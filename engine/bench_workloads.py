"""Benchmark workloads as token ids: the field's named ones, generated exactly as published, and
SGLang-style random ones. Each returns (prompts as id lists, output lengths, temperature)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Workload:
    name: str
    input_ids: list[list[int]]
    output_lens: list[int]
    temperature: float

    @property
    def input_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def nanovllm() -> Workload:
    """nano-vllm / mini-sglang's benchmark: 256 prompts, lengths uniform in [100, 1024], T=0.6."""
    random.seed(0)
    ids = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    outs = [random.randint(100, 1024) for _ in range(256)]
    return Workload("nanovllm", ids, outs, 0.6)


def fixed_512_256() -> Workload:
    random.seed(1)
    ids = [[random.randint(0, 10000) for _ in range(512)] for _ in range(256)]
    return Workload("512x256", ids, [256] * 256, 0.0)


def decode_heavy() -> Workload:
    random.seed(2)
    ids = [[random.randint(0, 10000) for _ in range(128)] for _ in range(512)]
    return Workload("decode-heavy", ids, [1024] * 512, 0.0)


def random_ids(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    vocab: int = 10000,
    name: str = "random",
) -> Workload:
    """SGLang's `random` dataset shape: lengths uniform in [ratio * len, len]."""
    rng = random.Random(seed)
    in_lens = [rng.randint(max(1, int(input_len * range_ratio)), input_len) for _ in range(num_prompts)]
    outs = [rng.randint(max(1, int(output_len * range_ratio)), output_len) for _ in range(num_prompts)]
    ids = [[rng.randint(0, vocab) for _ in range(n)] for n in in_lens]
    return Workload(name, ids, outs, 0.0)


def shared_prefix(
    num_groups: int,
    prompts_per_group: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int,
    vocab: int = 10000,
) -> Workload:
    rng = random.Random(seed)
    ids = []
    for _ in range(num_groups):
        prefix = [rng.randint(0, vocab) for _ in range(prefix_len)]
        ids += [prefix + [rng.randint(0, vocab) for _ in range(suffix_len)] for _ in range(prompts_per_group)]
    return Workload("prefix", ids, [output_len] * len(ids), 0.0)


NAMED = {
    "nanovllm": nanovllm,
    "512x256": fixed_512_256,
    "decode-heavy": decode_heavy,
    "sgl-random": lambda: random_ids(1000, 1024, 512, 0.5, seed=3, name="sgl-random"),
    "prefix": lambda: shared_prefix(64, 16, 1024, 128, 128, seed=4),
}
