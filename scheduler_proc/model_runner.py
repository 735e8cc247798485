"""ModelRunner: loads the model, sizes the KV pool, runs a forward step and samples. Tensors in (a
ForwardBatch, a SamplingBatch), hidden states, logits and sampled ids out: it knows nothing of requests.

Under tensor parallelism every rank has a ModelRunner over its shard; rank 0's forward() first hands
the step to the others (tp/step_broadcast.py), and every rank then runs the same run_forward().
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch

from engine.shared.args import EngineArgs, read_model_config
from scheduler_proc.attention import create_backend
from scheduler_proc.cuda_graph import CudaGraphRunner
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.grammar_mask import apply_token_mask
from scheduler_proc.host_cpus import size_torch_threads
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.loader import build_model
from scheduler_proc.sampler import SamplingBatch, SamplingState
from scheduler_proc.step_profile import StepProfiler
from scheduler_proc.tp.group import CollectiveFailed, TPGroup, rank_device
from scheduler_proc.tp.step_broadcast import StepChannel, ask_memory

logger = logging.getLogger(__name__)


@dataclass
class SampledIds:
    """One step's sampled token ids: on the device (for the next step's inputs) and on the host."""

    ids: torch.Tensor
    host: torch.Tensor
    event: Optional[torch.cuda.Event]  # recorded after the copy to the host (None on CPU)


@dataclass
class StepOutput:
    """What a launched step computes, queued on the device and not waited for."""

    hidden: torch.Tensor  # [T, H] the last hidden state of every token
    logits: torch.Tensor  # [R, V] of the batch's logit_rows (left unmodified by sampling)
    sampled: Optional[SampledIds]  # None when no row samples


class ModelRunner:
    def __init__(self, args: EngineArgs, tp: Optional[TPGroup] = None) -> None:
        self.args = args
        self.tp = tp or TPGroup()
        assert self.tp.size == args.tp_size, (self.tp.size, args.tp_size)
        self.device = rank_device(args, self.tp.rank)
        size_torch_threads(self.device)
        self.dtype = getattr(torch, args.dtype)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.config = read_model_config(args.model_path)
        start = time.perf_counter()
        architecture = (self.config.get("architectures") or ["?"])[0]
        weights = "random weights" if args.load_format == "dummy" else args.model_path
        logger.info("loading %s (%s, %s) on %s", architecture, weights, args.dtype, self.device)
        self.model = build_model(
            self.config,
            args.load_format,
            args.model_path,
            self.dtype,
            self.device,
            args.random_seed,
            self.tp,
            args.is_embedding,
            args.quantization,
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # loading's temporaries must not count as used when the pool is sized
        self.shape = self.model.shape
        logger.info("model loaded in %.1fs", time.perf_counter() - start)
        self.pool = self._make_pool()
        if self.tp.size > 1 and self.tp.is_first:
            self.pool.keep_journal()
        self.attention = create_backend(
            args.attention_backend,
            self.pool,
            args.device,
            self.shape.num_heads_per_rank,
            self.shape.num_kv_heads_per_rank,
            self.shape.head_dim,
            self.shape.layer_attention(),
            args.decode_attention_backend,
        )
        self.sampling = SamplingState(self.pool.max_requests, self.shape.vocab_size, self.device)
        self.graphs = self._make_graphs()  # every rank captures the same sizes in the same order: in lockstep
        self.steps = StepChannel(self.tp, self.device)  # the per-step hand-off to the other ranks
        # Rank 0's hand-off of each recent step (µs): the median is the figure; a mean would carry the
        # first steps' one-time costs (NCCL's first broadcast on a stream takes milliseconds).
        self.handoff_us: deque[float] = deque(maxlen=4096)
        self.profiler = StepProfiler(args.profile_steps, self.device)

    def recapture_graphs(self) -> None:
        """Capture the decode CUDA graphs again (resume_memory_occupation moved the weights and the KV)."""
        self.graphs = self._make_graphs()

    def _make_graphs(self) -> Optional[CudaGraphRunner]:
        if self.device.type != "cuda" or self.args.disable_cuda_graph:
            return None
        from scheduler_proc.attention.flashinfer_backend import FlashInferBackend

        if not isinstance(self.attention, FlashInferBackend):
            logger.warning("CUDA graphs need the flashinfer attention backend; decoding eagerly")
            return None
        max_bs = min(self.args.cuda_graph_max_bs or self.pool.max_requests, self.pool.max_requests)
        with torch.inference_mode():
            return CudaGraphRunner(self.model, self.attention, max_bs)

    def _make_pool(self) -> KVPool:
        shape, args = self.shape, self.args
        kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8_e4m3" else self.dtype
        per_token = KVPool.bytes_per_token(shape.num_layers, shape.num_kv_heads_per_rank, shape.head_dim, kv_dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * args.mem_fraction_static) - (total - free) - args.gpu_reserve_bytes
        else:
            budget = args.cpu_kv_pool_bytes
        # Every rank holds the same slots: the pool is as large as the rank with the least room allows.
        budget = self.tp.min_over_ranks(budget)
        if self.device.type == "cuda" and budget <= per_token * 16:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache on some rank: {budget / 2**30:.2f} GiB left after loading "
                f"weights (mem_fraction_static={args.mem_fraction_static}); cuda:{self.device.index} has "
                f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
            )
        num_tokens = budget // per_token
        if args.max_total_tokens is not None:
            num_tokens = min(num_tokens, args.max_total_tokens)
        max_requests = max(1, min(args.max_running_requests, num_tokens))
        pool = KVPool(
            shape.num_layers,
            num_tokens + 1,
            shape.num_kv_heads_per_rank,
            shape.head_dim,
            kv_dtype,
            self.device,
            max_requests,
            args.context_length + 1,
            compute_dtype=self.dtype,
        )
        pool.set_kv_scales(self.model.kv_scales)
        logger.info("KV pool: %d tokens, %.2f GiB, %d request rows", pool.capacity, pool.bytes / 2**30, max_requests)
        return pool

    def info(self) -> dict[str, Any]:
        """Figures for server_info (rank 0; under tensor parallelism it asks the other ranks too)."""
        cuda = self.device.type == "cuda"
        try:
            figures = ask_memory(self.tp, self.memory_figures())
        except Exception as exc:
            if self.tp.size == 1:
                raise
            raise CollectiveFailed(f"asking the tensor-parallel ranks for memory figures failed: {exc}") from exc
        ranks = [
            {
                "rank": r,
                "device": f"cuda:{d}" if d >= 0 else "cpu",
                "peak_gpu_memory_bytes": peak,
                "gpu_memory_allocated_bytes": allocated,
                "gpu_memory_total_bytes": total,
            }
            for r, (d, peak, allocated, total) in enumerate(figures)
        ]
        return {
            "device_name": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "peak_gpu_memory_bytes": ranks[0]["peak_gpu_memory_bytes"],
            "tp_size": self.tp.size,
            "rank_memory": ranks,
            "tp_step_broadcast_us": statistics.median(self.handoff_us) if self.handoff_us else 0.0,
            "kv_pool_tokens": self.pool.capacity,
            "kv_pool_bytes": self.pool.bytes,
            "max_running_requests": self.pool.max_requests,
            "vocab_size": self.shape.vocab_size,
            "hidden_size": self.shape.hidden_size,
            "num_layers": self.shape.num_layers,
            "attention_backend": type(self.attention).__name__,
            "decode_attention_backend": self.attention.decode_kernel,
            "cuda_graph_batch_sizes": self.graphs.sizes if self.graphs is not None else [],
        }

    def memory_figures(self) -> list[int]:
        """[device index (-1: CPU), peak allocated, allocated, total] bytes of this rank."""
        if self.device.type != "cuda":
            return [-1, 0, 0, 0]
        total = torch.cuda.get_device_properties(self.device).total_memory
        return [
            self.device.index,
            torch.cuda.max_memory_allocated(self.device),
            torch.cuda.memory_allocated(self.device),
            total,
        ]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; returns (hidden states of every token [T, H], logits of batch.logit_rows [R, V]).
        Under tensor parallelism (rank 0) the other ranks are handed the step first."""
        if self.tp.size == 1:
            return self.run_forward(batch)
        try:
            start = time.perf_counter()
            self.steps.send(batch, self.pool.take_journal())
            self.handoff_us.append(1e6 * (time.perf_counter() - start))
            return self.run_forward(batch)
        except Exception as exc:
            raise CollectiveFailed(f"a tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}") from exc

    @torch.inference_mode()
    def run_forward(self, batch: ForwardBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This rank's share of the step; the logits are None on ranks other than 0."""
        batch.attention = self.attention
        if self.graphs is not None and self.graphs.can_run(batch):
            hidden = self.graphs.run(batch)
        else:
            self.attention.plan(batch)
            hidden = self.model(batch)
        logits = self.model.compute_logits(hidden[batch.logit_rows])
        return hidden, logits

    @torch.inference_mode()
    def launch(self, batch: ForwardBatch, sampling: Optional[SamplingBatch], keep_hidden: bool) -> StepOutput:
        """Queue a step's forward pass and sampling; the sampled ids are copied to the host
        asynchronously (read them with wait()). keep_hidden: the hidden states outlive the step."""
        self.profiler.begin(batch)
        hidden, logits = self.forward(batch)
        if keep_hidden:
            hidden = hidden.clone()  # a CUDA graph's output buffer is overwritten by the next step
        sampled = self._sample(logits, sampling) if sampling is not None else None
        self.profiler.end()
        return StepOutput(hidden, logits, sampled)

    @torch.inference_mode()
    def sample(self, output: StepOutput, sampling: SamplingBatch, masked_logprobs: bool) -> None:
        """Queue the sampling of a step launched without it (its grammar mask was not ready then).
        masked_logprobs: the step's logits take the mask too, for the logprobs some request returns."""
        assert output.sampled is None
        output.sampled = self._sample(output.logits, sampling, masked_logprobs)

    def _sample(self, logits: torch.Tensor, sampling: SamplingBatch, masked_logprobs: bool = False) -> SampledIds:
        if sampling.grammar_mask is not None and masked_logprobs:  # logprobs of the masked distribution
            picked = logits[sampling.logit_index].float()
            apply_token_mask(picked, sampling.grammar_mask)
            logits.index_copy_(0, sampling.logit_index, picked.to(logits.dtype))
            ids = self.sampling.sample_rows(picked, sampling)
        else:  # the grammar's mask, if any, applies there (on the device inside the sampling kernel)
            ids = self.sampling.sample(logits, sampling)
        self.sampling.record(sampling.rows, ids)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=self.device.type == "cuda")
        host.copy_(ids, non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        return SampledIds(ids, host, event)

    def wait(self, sampled: Optional[SampledIds]) -> list[int]:
        """The sampled ids on the host, once the device has produced them."""
        if sampled is None:
            return []
        if sampled.event is not None:
            start, cpu = time.perf_counter(), time.thread_time()
            sampled.event.synchronize()
            self.profiler.waited(time.perf_counter() - start, time.thread_time() - cpu)
        return sampled.host.tolist()
