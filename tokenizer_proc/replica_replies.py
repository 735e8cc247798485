"""Control calls under data parallelism: every live scheduler replica answers, and the caller gets one
answer in the single-replica shape (SGLang's): server info with each replica's state in
`internal_states`, flush_cache ok only if every replica flushed, a trainer's call successful only if it
succeeded on every replica."""

from __future__ import annotations

from typing import Any, Optional

import msgspec

from engine.shared.weight_protocol import InitWeightsUpdateGroup, TrainerOp

# Figures of the engine as a whole, summed over the live replicas; every other top-level figure is the
# first live replica's (the replicas are alike), and each replica's own are in internal_states.
_SUMMED = ("num_running", "num_waiting", "num_retractions", "kv_free_tokens", "kv_cached_tokens", "kv_pool_tokens")


def args_for_replica(args: Optional[TrainerOp], replica: int, tp_size: int) -> Optional[TrainerOp]:
    """The op as replica `replica` runs it: in a trainer's weight-update group its ranks follow the
    earlier replicas' (rank r of replica i joins as rank_offset + i * tp_size + r)."""
    if isinstance(args, InitWeightsUpdateGroup) and replica:
        return msgspec.structs.replace(args, rank_offset=args.rank_offset + replica * tp_size)
    return args


def merge_server_info(answers: dict[int, dict[str, Any]], load: list[dict[str, Any]]) -> dict[str, Any]:
    """One server info from the live replicas' `answers` (by dp_rank) and every replica's `load` as the
    frontend sees it (Replicas.load_info)."""
    first = answers[min(answers)]
    merged = dict(first)
    for key in _SUMMED:
        if key in first:
            merged[key] = sum(info.get(key, 0) for info in answers.values())
    merged["tp_worker_pids"] = [pid for info in answers.values() for pid in info.get("tp_worker_pids", [])]
    merged["dp_size"] = len(load)
    merged["internal_states"] = [entry | answers.get(entry["dp_rank"], {}) for entry in load]
    return merged


def merge_replies(op: str, answers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """flush_cache's or a trainer call's answers (by dp_rank) as one; a single answer is returned as is."""
    if len(answers) == 1:
        return next(iter(answers.values()))
    ok_key = "ok" if op == "flush_cache" else "success"
    merged = dict(answers[min(answers)])  # a weight read: every replica holds the same weights
    merged[ok_key] = all(answer[ok_key] for answer in answers.values())
    messages = {answer["message"] for answer in answers.values()}
    if len(messages) > 1:
        merged["message"] = "; ".join(f"replica {r}: {answers[r]['message']}" for r in sorted(answers))
    return merged
