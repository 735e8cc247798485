"""Embedding requests: their prompt's final-normed hidden states pooled into one vector, chunk by chunk as
the prompt is prefilled (the last token's, the mean, or the first's; then L2-normalised when the model's
pooling says so), sent back in the request's extras when its prompt is done."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.shared.pooling import PoolingConfig
from engine.shared.protocol import Array
from scheduler_proc.request import Request


class Pooler:
    """The engine's pooling (one per embedding engine); each request's partial result lives on the request."""

    def __init__(self, config: PoolingConfig) -> None:
        self.config = config

    def add(self, req: Request, rows: torch.Tensor, first: int) -> None:
        """rows: the hidden states of prompt positions [first, first + len(rows)) of req."""
        mode, end, length = self.config.mode, first + rows.shape[0], len(req.input_ids)
        if mode == "mean":
            total = rows.float().sum(dim=0)
            req.pooled = total if req.pooled is None else req.pooled + total
        elif mode == "cls" and first == 0:
            req.pooled = rows[0].float()
        if end < length:
            return
        if mode == "last":
            req.pooled = rows[-1].float()
        vector = req.pooled / length if mode == "mean" else req.pooled
        if self.config.normalize:
            vector = F.normalize(vector, dim=0)
        array = vector.cpu().numpy()
        req.pending_extras().embedding = Array(data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))
        req.pooled = None
