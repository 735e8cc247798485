"""Host cost of structured output per step: xgrammar filling the token masks of a batch of JSON-schema
matchers and advancing them past one token each, in one call on one thread against the rows split over
2, 4 or 8 threads. Matchers walk random allowed tokens, so the states cover strings, numbers and structure.

    python scripts/bench_grammar_host.py [--rows 256 --steps 60] [--result-file docs/bench/<file>.jsonl]

Prints ms per step for each way; CPU only (run it on the device's host to size the scheduler's threads)."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bench_structured import SCHEMA  # noqa: E402  (the schema the engine-level benchmark constrains to)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--result-file", default=None)
    args = p.parse_args()

    import numpy as np
    import xgrammar
    from transformers import AutoTokenizer

    from engine.shared.model_files import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    vocab = len(tokenizer.get_vocab())
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[tokenizer.eos_token_id])
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)
    matchers = [xgrammar.GrammarMatcher(grammar) for _ in range(args.rows)]
    bits = xgrammar.allocate_token_bitmask(args.rows, vocab)
    pool = ThreadPoolExecutor(8)

    def accept(part: list[int], tokens: list[int]) -> list[bool]:
        return xgrammar.BatchGrammarMatcher.batch_accept_token([matchers[i] for i in part], [tokens[i] for i in part])

    def accept_in(shards: int):
        parts = [list(range(i, args.rows, shards)) for i in range(shards)]
        if shards == 1:
            return lambda tokens: accept(parts[0], tokens)
        return lambda tokens: list(pool.map(lambda part: accept(part, tokens), parts))

    accepts = {k: accept_in(k) for k in (1, 2, 4, 8)}
    fills = {k: xgrammar.BatchGrammarMatcher(max_threads=k) for k in (1, 2, 4, 8)}
    accept_s = dict.fromkeys(accepts, 0.0)
    fill_s = dict.fromkeys(fills, 0.0)
    rng = random.Random(0)
    shifts = np.arange(32, dtype=np.uint32)
    for step in range(args.steps):
        for k, batch in fills.items():
            start = time.perf_counter()
            batch.batch_fill_next_token_bitmask(matchers, bits, list(range(args.rows)))
            fill_s[k] += time.perf_counter() - start
        words = bits.numpy().view(np.uint32)
        tokens = []
        for row in range(args.rows):
            allowed = np.nonzero(((words[row][:, None] >> shifts) & 1).reshape(-1)[:vocab])[0]
            tokens.append(int(rng.choice(allowed)))
        k = list(accepts)[step % len(accepts)]  # each way advances every 4th step
        start = time.perf_counter()
        accepts[k](tokens)
        accept_s[k] += time.perf_counter() - start
    per_way = args.steps / len(accepts)
    row = {
        "bench": "grammar_host",
        "rows": args.rows,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "fill_ms": {str(k): 1e3 * v / args.steps for k, v in fill_s.items()},
        "accept_ms": {str(k): 1e3 * v / per_way for k, v in accept_s.items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    _report(row, args.result_file)


def _report(row: dict, result_file: str | None) -> None:
    """The table of fill and accept ms per step by thread count; the JSON line to result_file."""
    print(f"{row['rows']} JSON-schema matchers, {row['cores']} cores: ms per step")
    print(f"{'threads':<10}{'fill':>8}{'accept':>8}")
    for k in row["fill_ms"]:
        print(f"{k:<10}{row['fill_ms'][k]:>8.2f}{row['accept_ms'][k]:>8.2f}")
    if result_file:
        with open(result_file, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
