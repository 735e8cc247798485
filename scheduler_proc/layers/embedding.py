"""The token embedding and the LM head, split over the tensor-parallel ranks by vocabulary rows.

The vocabulary is padded to a multiple of tp_size; padded rows are zero and their logits are cut off.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.kernels import LinearKernel
from scheduler_proc.layers.linear import read_block
from scheduler_proc.tp.group import TPGroup


class VocabParallelEmbedding(nn.Module):
    """Rank r holds the embedding rows of token ids [r * shard, (r + 1) * shard)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tp
        self.shard = -(-vocab_size // tp.size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Each token's row lives on one rank: the others contribute zeros to the sum.
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.tp.all_reduce(out)

    def load(self, kind: str, source: Any, name: str) -> None:
        rows = max(0, min(self.shard, self.vocab_size - self.start))  # the last rank's shard is part padding
        block = read_block(source, name, [self.vocab_size, self.hidden_size], 0, self.start, self.start + rows)
        self.weight.data[:rows].copy_(block)
        self.weight.data[rows:].zero_()

    def checkpoint_shapes(self, name: str) -> dict[str, list[int]]:
        return {f"{name}.weight": [self.vocab_size, self.hidden_size]}


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of the rank's vocabulary rows, gathered on rank 0.

    Gathered rather than sampled over the shards: sampling needs the whole vocabulary at once (top-p's
    sort, penalties, logit bias, logprobs and their top-k), and doing each over shards would cost a
    collective per operation and a second sampler; the gather moves rows x vocab values once per step,
    small beside the weights a step reads.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup) -> None:
        super().__init__(vocab_size, hidden_size, tp)
        self.matmul = LinearKernel()

    def forward(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits [R, vocab] in the model's dtype on rank 0 (an empty float32 tensor when R = 0); None on the
        other ranks (which take part in the gather)."""
        if hidden.shape[0] == 0:  # a step that needs no logits (a prompt's middle chunk): on every rank alike
            return hidden.new_zeros(0, self.vocab_size, dtype=torch.float32) if self.tp.is_first else None
        logits = self.tp.gather_last_dim(self.matmul(hidden, self.weight))
        return logits[:, : self.vocab_size] if logits is not None else None
