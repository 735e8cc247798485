"""Attention in plain torch: gather each sequence's KV from the pool into a padded batch, then SDPA.

The reference backend (CPU, or GPU without flashinfer). One gather index and one mask are built per
step and shared by every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scheduler_proc.attention.base import AttentionBackend
from scheduler_proc.batch import ForwardBatch


class TorchBackend(AttentionBackend):
    def plan(self, batch: ForwardBatch) -> None:
        device = self.pool.device
        prefix = torch.tensor(batch.prefix_lens_cpu, dtype=torch.int64)
        extend = torch.tensor(batch.extend_lens_cpu, dtype=torch.int64)
        total = prefix + extend
        max_q, max_kv = int(extend.max()), int(total.max())
        self.out_cache_loc = batch.out_cache_loc
        # Packed token t of sequence b sits at padded row (b, t - start_b).
        seq_of_token = torch.repeat_interleave(torch.arange(len(extend)), extend)
        starts = torch.cumsum(extend, 0) - extend
        self.q_rows = seq_of_token.to(device)
        self.q_cols = (torch.arange(int(extend.sum())) - starts[seq_of_token]).to(device)
        rows = self.pool.req_to_token[batch.req_pool_indices, :max_kv].to(torch.int64)
        key_pos = torch.arange(max_kv)
        valid = key_pos[None, :] < total[:, None]
        self.kv_index = torch.where(valid.to(device), rows, torch.zeros_like(rows))
        query_pos = prefix[:, None] + torch.arange(max_q)[None, :]  # [B, Qmax] absolute positions
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & valid[:, None, :]
        mask[:, :, 0] |= ~mask.any(-1)  # padded query rows see one key, so no row is all -inf
        self.mask = mask[:, None].to(device)
        self.shape = (len(extend), max_q)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
        k_buf, v_buf = self.pool.k_buffer[layer_id], self.pool.v_buffer[layer_id]
        k_buf[self.out_cache_loc] = k
        v_buf[self.out_cache_loc] = v
        batch_size, max_q = self.shape
        q_pad = q.new_zeros(batch_size, max_q, q.shape[1], q.shape[2])
        q_pad[self.q_rows, self.q_cols] = q
        keys, values = k_buf[self.kv_index], v_buf[self.kv_index]  # [B, Lmax, Hkv, D]
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=self.mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(1, 2)[self.q_rows, self.q_cols].reshape(q.shape[0], -1)
