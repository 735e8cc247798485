"""CUDA graphs for decode steps: captured at start-up for a ladder of batch sizes, largest first, into
one shared memory pool; a step is padded to the next captured size (padded rows write KV to slot 0)."""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.models.decoder import CausalLM

if TYPE_CHECKING:
    from scheduler_proc.attention.flashinfer_backend import FlashInferBackend

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, max(max_batch_size, 288) + 1, 32))
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


class CudaGraphRunner:
    def __init__(self, model: CausalLM, backend: FlashInferBackend, max_batch_size: int) -> None:
        self.model, self.backend = model, backend
        self.sizes = batch_size_ladder(max_batch_size)
        device = backend.pool.device
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        logger.info("capturing CUDA graphs for %d decode batch sizes (1..%d)", len(self.sizes), max_batch_size)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            backend.make_graph_decoder(size, max_batch_size)
            self._capture(size, pool)
        logger.info(
            "captured %d CUDA graphs (batch 1..%d) in %.1fs",
            len(self.sizes),
            max_batch_size,
            time.perf_counter() - start,
        )

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def can_run(self, batch: ForwardBatch) -> bool:
        # A vision-language model's decode replays too (its rope positions are [T], shifted); a one-token
        # step on an image token (M-RoPE's [3, T], an embedding to place) runs eagerly.
        plain_rope = batch.rope_positions is None or batch.rope_positions.dim() == 1
        return batch.is_decode and batch.batch_size <= self.max_batch_size and plain_rope and not batch.image_parts

    def _static_batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            out_cache_loc=self.out_cache_loc[:size],
            req_pool_indices=torch.zeros(size, dtype=torch.int64, device=self.input_ids.device),
            prefix_lens_cpu=[0] * size,
            extend_lens_cpu=[1] * size,
            logit_rows=torch.arange(size, device=self.input_ids.device),
            is_decode=True,
            attention=self.backend,
        )

    def _capture(self, size: int, pool) -> None:
        batch = self._static_batch(size)
        self.backend.plan_graph(batch, size)
        for _ in range(2):  # warm up: lazy initialisation must not happen inside the capture
            self.model(batch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (NCCL's watchdog polling its events, under tensor
        # parallelism) must not invalidate this thread's capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.hidden[size] = self.model(batch)
        self.graphs[size] = graph

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the graph for this decode batch; returns the hidden states of its B rows."""
        n = batch.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(batch.input_ids)
        # Inside the graph positions only rotate q and k (the KV slots are planned apart).
        self.positions[:n].copy_(batch.positions if batch.rope_positions is None else batch.rope_positions)
        self.out_cache_loc[:n].copy_(batch.out_cache_loc)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.out_cache_loc[n:size].zero_()
        self.backend.plan_graph(batch, size)
        self.graphs[size].replay()
        return self.hidden[size][:n]
