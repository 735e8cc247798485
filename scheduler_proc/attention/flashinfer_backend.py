"""Attention on flashinfer's paged kernels, page size 1 over the token pool.

Each step is planned once (host-side index arrays) and every layer reuses the plan. A step that only
decodes uses the decode kernel; any step with prompt tokens uses the causal paged prefill kernel over
prefix + new tokens (the new tokens' KV is written to the pool first), so cached prefixes need nothing
special. CUDA-graph decode keeps one decode wrapper per captured batch size with fixed index buffers.
By default (decode_attention_backend None or "triton") decode steps read the pool through triton_decode.py's
kernel instead, which needs no plan and no index list: it reads each sequence's slots from req_to_token, given the
step's request rows and KV lengths on the device (under a graph, copied into fixed buffers), so a decode
step costs the host no planning at all. Layers with a window or soft cap keep flashinfer's decode kernel.

flashinfer fixes a layer's sliding window (`window_left`), score scale and soft cap when it plans, so
layers that differ there (Gemma's local and global layers) get a wrapper each, planned once per step
over the same KV indices (the window masks the keys outside it; they are still in the index list).

Every host tensor a plan copies to the device is pinned: a copy from pageable memory waits for the stream
to drain, which would hold the host behind the step in flight and leave the device idle while the next
step is planned (overlap scheduling lost).
"""

from __future__ import annotations

import builtins
import sys
from typing import Any, Optional

import flashinfer
import torch

from scheduler_proc.attention.base import AttentionBackend, LayerAttention
from scheduler_proc.attention.store_kv import store_kv
from scheduler_proc.attention.triton_decode import TritonDecoder
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.kv_pool import KVPool

_WORKSPACE_BYTES = 256 << 20


def _one_reduction_max(*args: Any, **kwargs: Any) -> Any:
    """builtins.max, but a tensor's max in one reduction. flashinfer 0.5's plan() takes `max()` of host
    length tensors, which Python walks element by element (~4 us each: 1-2 ms a step at batch 256-512)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0].max()
    return builtins.max(*args, **kwargs)


def _fast_plan_max() -> None:
    """Give flashinfer's planning modules the max above (their name `max`, shadowing the builtin)."""
    for name in ("flashinfer.decode", "flashinfer.prefill"):
        sys.modules[name].max = _one_reduction_max  # type: ignore[attr-defined]


class FlashInferBackend(AttentionBackend):
    def __init__(
        self,
        pool: KVPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layers: Optional[list[LayerAttention]] = None,
        triton_decode: bool = False,
    ) -> None:
        super().__init__(pool, layers)
        _fast_plan_max()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        device = pool.device
        # Shared by every wrapper: it holds one run's scratch, and runs follow one another on the stream.
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.kinds = list(dict.fromkeys(self.layers))  # distinct layer kinds, one plan (wrapper) each
        self.kind_of_layer = [self.kinds.index(layer) for layer in self.layers]
        # Tensor-core decode pays off once several query heads share a KV head.
        self.decode_tensor_cores = num_heads // num_kv_heads >= 4
        # fa2, not "auto" (fa3 on Hopper): over page-size-1 KV, fa3 ran mixed prefill+decode steps 1.2-2x slower
        # (scripts/bench_attention.py on an H200).
        self.prefill = [
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2") for _ in self.kinds
        ]
        self.decode = [
            flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=self.decode_tensor_cores
            )
            for _ in self.kinds
        ]
        self.graph_decoders: dict[int, list[flashinfer.BatchDecodeWithPagedKVCacheWrapper]] = {}
        self.graph_indices: torch.Tensor | None = None  # shared by every captured batch size
        self.triton = TritonDecoder(pool, head_dim, self.layers) if triton_decode else None
        self.triton_step = False  # this step decodes on self.triton
        self.active = self.decode
        self.out_cache_loc: torch.Tensor | None = None
        self.ones = torch.ones(pool.max_requests + 1024, dtype=torch.int32, pin_memory=True)
        # A plan writes flashinfer's pinned staging buffer and queues its copy to the device; the next plan
        # must not rewrite that buffer before the copy has run.
        self.planned = torch.cuda.Event()

    @property
    def decode_kernel(self) -> str:
        return "triton" if self.triton is not None else "flashinfer"

    # ---- planning ----

    def kv_indices(self, req_pool_indices: torch.Tensor, seq_lens_cpu: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_indptr on host, kv slot indices on device) of the batch's sequences, without a sync."""
        # Pinned, so that the copies below do not wait for the step in flight (overlap scheduling).
        seq_lens = torch.tensor(seq_lens_cpu, dtype=torch.int32, pin_memory=True)
        indptr = torch.zeros(len(seq_lens_cpu) + 1, dtype=torch.int32, pin_memory=True)
        torch.cumsum(seq_lens, 0, out=indptr[1:])
        total = int(indptr[-1])
        device = self.pool.device
        lens = seq_lens.to(device, non_blocking=True)
        seq_of_token = torch.repeat_interleave(torch.arange(len(seq_lens_cpu), device=device), lens, output_size=total)
        starts = indptr[:-1].to(device, non_blocking=True)
        offsets = torch.arange(total, device=device) - starts[seq_of_token]
        indices = self.pool.req_to_token[req_pool_indices[seq_of_token], offsets]
        return indptr, indices

    def plan(self, batch: ForwardBatch) -> None:
        self.out_cache_loc = batch.out_cache_loc
        self.triton_step = batch.is_decode and self.triton is not None
        if self.triton_step:
            self.triton.plan(batch)
            return
        indptr, indices = self.kv_indices(batch.req_pool_indices, batch.seq_lens_cpu)
        self._plan_with(batch, indptr, indices, self.decode if batch.is_decode else None)

    def plan_graph(self, batch: ForwardBatch, padded: int) -> None:
        """Plan a decode step replayed in the CUDA graph of batch size `padded` (rows past B read slot 0)."""
        self.out_cache_loc = batch.out_cache_loc
        self.triton_step = self.triton is not None
        if self.triton_step:
            self.triton.plan_graph(batch, padded)
            return
        indptr, indices = self.kv_indices(batch.req_pool_indices[: batch.batch_size], batch.seq_lens_cpu)
        pad = padded - batch.batch_size
        if pad:  # each padded row reads one KV slot, slot 0
            padded_indptr = torch.empty(padded + 1, dtype=torch.int32, pin_memory=True)
            padded_indptr[: len(indptr)] = indptr
            torch.arange(1, pad + 1, dtype=torch.int32, out=padded_indptr[len(indptr) :]).add_(indptr[-1])
            indptr = padded_indptr
            indices = torch.cat([indices, torch.zeros(pad, dtype=indices.dtype, device=indices.device)])
        self._plan_with(batch, indptr, indices, self.graph_decoders[padded])

    def _plan_with(self, batch: ForwardBatch, indptr: torch.Tensor, indices: torch.Tensor, decoders) -> None:
        """Plan every layer kind's wrapper: the decoders given, or the prefill wrappers when None."""
        dtype, kv_dtype = self.pool.compute_dtype, self.pool.k_buffer.dtype  # kv_dtype: e4m3 in an FP8 pool
        last_page_len = self.ones[: len(indptr) - 1]
        indices = indices.to(torch.int32)
        shape = (self.num_heads, self.num_kv_heads, self.head_dim, 1)
        self.planned.synchronize()  # the previous plan's copies have run: their staging buffers may be rewritten
        if decoders is not None:
            for kind, decoder in zip(self.kinds, decoders):
                decoder.plan(
                    indptr, indices, last_page_len, *shape, q_data_type=dtype, kv_data_type=kv_dtype, **_options(kind)
                )
            self.active = decoders
        else:
            qo_indptr = torch.zeros(batch.batch_size + 1, dtype=torch.int32, pin_memory=True)
            torch.cumsum(torch.tensor(batch.extend_lens_cpu, dtype=torch.int32), 0, out=qo_indptr[1:])
            # The KV lengths, pinned: without them plan() derives its own in pageable memory, and copying
            # that to the device waited for the step in flight (no overlap for prefill steps).
            kv_lens = indptr[1:] - indptr[:-1]
            kv_lens = torch.empty_like(kv_lens, pin_memory=True).copy_(kv_lens)
            for kind, prefill in zip(self.kinds, self.prefill):
                prefill.plan(
                    qo_indptr,
                    indptr,
                    indices,
                    last_page_len,
                    *shape,
                    causal=True,
                    seq_lens=kv_lens,
                    q_data_type=dtype,
                    kv_data_type=kv_dtype,
                    **_options(kind),
                )
            self.active = self.prefill
        self.planned.record()

    # ---- CUDA graphs ----

    def make_graph_decoder(self, batch_size: int, max_batch_size: int) -> None:
        device = self.pool.device
        if self.triton is not None:
            self.triton.make_graph_buffers(max_batch_size)
            return
        if self.graph_indices is None:
            self.graph_indices = torch.zeros(self.pool.num_slots + max_batch_size, dtype=torch.int32, device=device)
        # The kinds' wrappers share their index buffers: each plan writes the same indices into them.
        indptr_buffer = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
        last_page_len_buffer = torch.ones(batch_size, dtype=torch.int32, device=device)
        self.graph_decoders[batch_size] = [
            flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=self.decode_tensor_cores,
                paged_kv_indptr_buffer=indptr_buffer,
                paged_kv_indices_buffer=self.graph_indices,
                paged_kv_last_page_len_buffer=last_page_len_buffer,
            )
            for _ in self.kinds
        ]

    # ---- per layer ----

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        pool = self.pool
        k_buf, v_buf = pool.k_buffer[layer_id], pool.v_buffer[layer_id]
        k_scale, v_scale = pool.kv_scales[layer_id]
        if not pool.is_fp8:
            store_kv(k, v, k_buf, v_buf, self.out_cache_loc)
        else:
            # FP8 pool: k / k_scale and v / v_scale in e4m3, copied as bytes (the store kernel then needs no
            # FP8 type, which Triton lacks before Ada); attention reads e4m3 and multiplies the scales back in.
            k8, v8 = pool.to_pool_dtype(k, k_scale).view(torch.uint8), pool.to_pool_dtype(v, v_scale).view(torch.uint8)
            store_kv(k8, v8, k_buf.view(torch.uint8), v_buf.view(torch.uint8), self.out_cache_loc)
        if self.triton_step:
            return self.triton.attend(q, layer_id)
        kv = (k_buf.unsqueeze(1), v_buf.unsqueeze(1))  # [slots, page_size=1, Hkv, D]
        wrapper = self.active[self.kind_of_layer[layer_id]]
        if not pool.is_fp8:
            return wrapper.run(q, kv).reshape(q.shape[0], -1)
        # A scale of 1.0 passed as None: flashinfer then skips multiplying the output by it (one kernel less).
        scales = {"k_scale": k_scale if k_scale != 1.0 else None, "v_scale": v_scale if v_scale != 1.0 else None}
        return wrapper.run(q, kv, **scales).reshape(q.shape[0], -1)


def _options(kind: LayerAttention) -> dict[str, Any]:
    """flashinfer's plan arguments for a layer kind: window_left counts the keys before the query."""
    window_left = kind.window - 1 if kind.window is not None else -1
    return {"window_left": window_left, "logits_soft_cap": kind.softcap, "sm_scale": kind.scale}
