"""A weight read back by its checkpoint (Hugging Face) name, as the engine holds it, so that a trainer
can check a sync: each rank takes its block of the tensor out of the fused or sharded parameter that
holds it, and rank 0 joins the blocks of every rank (SGLang's get_weights_by_name). An FP8 weight is
read dequantized (e4m3 values times their scales).

Not for speed: the rows asked for cross the host group in float32, from every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from scheduler_proc.layers.embedding import VocabParallelEmbedding
from scheduler_proc.layers.fp8 import dequantize
from scheduler_proc.layers.linear import ColumnParallelLinear, RowParallelLinear
from scheduler_proc.models.decoder import CausalLM
from scheduler_proc.tp.group import TPGroup
from scheduler_proc.weight_update import UpdateRefused


@dataclass
class Block:
    """This rank's block of a checkpoint tensor, and how the ranks' blocks join."""

    values: torch.Tensor
    join: str  # "whole" (every rank holds all of it), "rows", "columns" or "vocab"
    shard: int = 0  # for "rows": which of the tensor's blocks this is (ranks may hold the same one)


def read_weight(model: CausalLM, tp: TPGroup, name: str, truncate_size: int) -> Optional[list[Any]]:
    """The tensor's first `truncate_size` entries along its first dimension, as nested lists of float
    (rank 0; None on the other ranks, which must call this too)."""
    block = local_block(model, model.checkpoint_name(name), name)
    # The first rows of the joined tensor are among the first rows of the blocks (joined along rows or
    # side by side): only those cross to rank 0.
    values = block.values[:truncate_size].detach().to("cpu", torch.float32)
    if tp.size > 1 and block.join != "whole":
        values = _join(tp, block, values)
    if not tp.is_first or values is None:
        return None
    if block.join == "vocab":
        values = values[: model.shape.vocab_size]  # the last shard's padding rows
    return values[:truncate_size].tolist()


def local_block(model: CausalLM, key: str, name: str) -> Block:
    """Where the checkpoint tensor `key` (the caller's `name`) lives on this rank."""
    if key == "lm_head.weight" and model.shape.tie_word_embeddings:
        key = "model.embed_tokens.weight"
    owner, kind = key.rsplit(".", 1) if "." in key else ("", key)
    parent, part_name = owner.rsplit(".", 1) if "." in owner else ("", owner)
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        if isinstance(module, ColumnParallelLinear) and module_name.rsplit(".", 1)[0] == parent:
            for index, part in enumerate(module.parts):
                if part.name == part_name and getattr(module, kind, None) is not None:
                    rows = _value(module, kind)[module.offsets[index] : module.offsets[index + 1]]
                    return Block(rows, "rows", part.shard)
    module = modules.get(owner)
    if isinstance(module, RowParallelLinear) and kind == "weight":
        return Block(_value(module, kind), "columns")
    if isinstance(module, VocabParallelEmbedding):
        return Block(module.weight, "vocab")
    params = dict(model.named_parameters())
    if key not in params:
        raise UpdateRefused(f"{type(model).__name__} has no weight named {name!r}")
    return Block(params[key], "whole")


def _value(module: torch.nn.Module, kind: str) -> torch.Tensor:
    """A linear layer's weight or bias as the model computes with it: an FP8 weight times its scales."""
    if kind == "weight" and getattr(module, "fp8", None) is not None:
        return dequantize(module.weight, module.weight_scale, torch.float32, module.fp8.block)
    return getattr(module, kind)


def _join(tp: TPGroup, block: Block, values: torch.Tensor) -> Optional[torch.Tensor]:
    """Rank 0 joins every rank's block (all of one shape); the others send theirs and get None."""
    import torch.distributed as dist

    shards = tp.gather_ints([block.shard])
    parts = [torch.empty_like(values) for _ in range(tp.size)] if tp.is_first else None
    dist.gather(values.contiguous(), parts, dst=0, group=tp.host_group)
    if parts is None or shards is None:
        return None
    if block.join == "columns":
        return torch.cat(parts, dim=1)
    if block.join == "rows":  # ranks holding a replicated KV head hold the same block: keep one of each
        by_shard = {shard[0]: part for shard, part in zip(shards, parts)}
        return torch.cat([by_shard[s] for s in sorted(by_shard)])
    return torch.cat(parts)
