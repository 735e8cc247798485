"""Attention in plain torch: gather each sequence's KV from the pool into a padded batch, then SDPA.

The reference backend (CPU, or GPU without flashinfer). One gather index per step, and one mask per
distinct sliding window, are built per step and shared by every layer. Rows move with index_select /
index_copy_ (whole [Hkv, D] rows at a time), not advanced indexing, which on CPU copies element by
element; a decode step (one query per sequence) needs no query padding at all. Layers with soft-capped
scores (Gemma 2) take a plain matmul-softmax path, which SDPA cannot express.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from scheduler_proc.attention.base import AttentionBackend, LayerAttention
from scheduler_proc.forward_batch import ForwardBatch


class TorchBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        device = self.pool.device
        prefix, extend = batch.prefix_lens_cpu, batch.extend_lens_cpu
        total = [p + e for p, e in zip(prefix, extend)]
        batch_size, max_q, max_kv = len(extend), max(extend), max(total)
        self.out_cache_loc = batch.out_cache_loc
        self.shape = (batch_size, max_q, max_kv)
        # Packed token t of sequence b sits at row b * max_q + t of the padded queries; None when
        # every sequence has max_q new tokens (decode), so the packed queries are the padded ones.
        self.q_index: Optional[torch.Tensor] = None
        if any(e != max_q for e in extend):
            flat = [b * max_q + t for b, e in enumerate(extend) for t in range(e)]
            self.q_index = torch.tensor(flat, dtype=torch.int64, device=device)
        total_t = torch.tensor(total, dtype=torch.int64)
        key_pos = torch.arange(max_kv)
        valid = key_pos[None, :] < total_t[:, None]  # [B, Lmax]
        rows = self.pool.req_to_token[batch.req_pool_indices, :max_kv]
        # Keys past a sequence's end read slot 0 (never handed out) and are masked.
        self.kv_index = torch.where(valid.to(device), rows, torch.zeros_like(rows)).view(-1)
        windows = {layer.window for layer in self.layers}
        self.masks = {w: _mask(prefix, total, valid, max_q, w, device) for w in windows}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        keys, values = self._store_and_gather(k, v, layer_id, q.dtype)
        batch_size, max_q, max_kv = self.shape
        num_heads, head_dim = q.shape[1], q.shape[2]
        if self.q_index is None:
            q_pad = q.view(batch_size, max_q, num_heads, head_dim)
        else:
            q_pad = q.new_zeros(batch_size * max_q, num_heads, head_dim).index_copy_(0, self.q_index, q)
            q_pad = q_pad.view(batch_size, max_q, num_heads, head_dim)
        kv_shape = (batch_size, max_kv, k.shape[1], head_dim)
        keys = keys.view(kv_shape).transpose(1, 2)
        values = values.view(kv_shape).transpose(1, 2)
        layer = self.layers[layer_id]
        mask = self.masks[layer.window]
        if layer.softcap is None:
            out = F.scaled_dot_product_attention(
                q_pad.transpose(1, 2),
                keys,
                values,
                attn_mask=mask,
                scale=layer.scale,
                enable_gqa=num_heads != k.shape[1],
            )
        else:
            out = _softcapped_attention(q_pad.transpose(1, 2), keys, values, mask, layer)
        out = out.transpose(1, 2).reshape(batch_size * max_q, num_heads * head_dim)
        return out if self.q_index is None else out.index_select(0, self.q_index)

    def _store_and_gather(
        self, k: torch.Tensor, v: torch.Tensor, layer_id: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's k, v into the pool, then read every sequence's keys and values [B * Lmax, Hkv, D]
        in `dtype`. An FP8 pool is written and read as bytes (torch's CPU index ops have no FP8 kernels)
        and upcast times the layer's scale."""
        pool = self.pool
        k_buf, v_buf = pool.k_buffer[layer_id], pool.v_buffer[layer_id]
        if not pool.is_fp8:
            k_buf.index_copy_(0, self.out_cache_loc, k)
            v_buf.index_copy_(0, self.out_cache_loc, v)
            return k_buf.index_select(0, self.kv_index), v_buf.index_select(0, self.kv_index)
        gathered = []
        for buf, x, scale in zip((k_buf, v_buf), (k, v), pool.kv_scales[layer_id]):
            stored = pool.to_pool_dtype(x, scale)
            buf.view(torch.uint8).index_copy_(0, self.out_cache_loc, stored.view(torch.uint8))
            read = buf.view(torch.uint8).index_select(0, self.kv_index).view(buf.dtype).to(dtype)
            gathered.append(read if scale == 1.0 else read * scale)
        return gathered[0], gathered[1]


def _mask(
    prefix: list[int], total: list[int], valid: torch.Tensor, max_q: int, window: Optional[int], device: torch.device
) -> Optional[torch.Tensor]:
    """[B, 1, Qmax, Lmax] bool, True where a query may attend; None when every query sees every key."""
    if max_q == 1 and window is None:  # one query per sequence, the last position: it sees all of its own keys
        return None if min(total) == max(total) else valid[:, None, None, :].to(device)
    prefix_t = torch.tensor(prefix, dtype=torch.int64)
    query_pos = prefix_t[:, None] + torch.arange(max_q)[None, :]  # [B, Qmax] absolute positions
    key_pos = torch.arange(valid.shape[1])
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & valid[:, None, :]
    if window is not None:  # as HF: key k is seen from query q when q - window < k <= q
        mask &= key_pos[None, None, :] > query_pos[:, :, None] - window
    mask[:, :, 0] |= ~mask.any(-1)  # padded query rows see one key, so no row is all -inf
    return mask[:, None].to(device)


def _softcapped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor], layer: LayerAttention
) -> torch.Tensor:
    """q [B, Hq, Q, D] over keys/values [B, Hkv, L, D], as HF's eager Gemma 2 attention: scaled scores,
    soft-capped, masked, softmax in float32."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scale = layer.scale if layer.scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)
