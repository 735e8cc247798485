"""The Qwen2.5-VL vision tower: patch embedding, blocks of window attention with a few full-attention
blocks between them, 2-D rotary positions, and the patch merger that turns each 2x2 block of patches
into one language-model token.

Several images run as one packed sequence: attention stays within an image (full blocks) or within a
window of it (the other blocks). Segments of equal length are attended together in one batched SDPA
call, so a step of many same-sized images costs a few kernel launches per block, not one per window.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scheduler_proc.layers.norm import RMSNorm

_VISION_NORM_EPS = 1e-6  # fixed in Qwen2.5-VL's vision tower, not read from its config
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass
class Segments:
    """Runs of consecutive tokens that attend only among themselves, grouped by length:
    per length, the index of every token of every run of that length, [runs, length]."""

    groups: list[torch.Tensor]
    contiguous: bool  # one group covering all tokens in order: a reshape replaces the gather


@dataclass
class Layout:
    """Everything about a list of image grids that the forward pass needs, computed once per grid list."""

    window_index: torch.Tensor  # merged units in window order
    reverse_index: torch.Tensor  # back to the images' order
    positions: torch.Tensor  # [patches, 2] (row, column) of each patch, in window order
    full: Segments  # one run per image frame
    windows: Segments  # one run per window


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if segments.contiguous:
            length = segments.groups[0].shape[1]
            out = _attend(*(t.view(-1, length, self.num_heads, self.head_dim) for t in (q, k, v)))
            out = out.reshape(tokens, -1)
        else:
            out = q.new_empty(tokens, self.num_heads, self.head_dim)
            for index in segments.groups:
                out[index] = _attend(q[index], k[index], v[index])
            out = out.view(tokens, -1)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, _VISION_NORM_EPS)
        self.norm2 = RMSNorm(dim, _VISION_NORM_EPS)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """HF's Conv3d whose stride equals its kernel, over inputs exactly one kernel in size: a matmul."""

    def __init__(self, patch_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class PatchMerger(nn.Module):
    def __init__(self, dim: int, out_dim: int, merge_size: int) -> None:
        super().__init__()
        self.merged_dim = dim * merge_size**2
        self.ln_q = RMSNorm(dim, _VISION_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class VisionTower(nn.Module):
    """Patches of several images [patches, patch_dim] -> their language-model embeddings [tokens, out_dim]."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        dim, heads = int(config["hidden_size"]), int(config["num_heads"])
        self.patch_size = int(config.get("patch_size", 14))
        self.merge_size = int(config.get("spatial_merge_size", 2))
        self.window_size = int(config.get("window_size", 112))
        self.full_blocks = set(config.get("fullatt_block_indexes", ()))
        self.head_dim = dim // heads
        self.rope_theta = float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        channels = int(config.get("in_channels", config.get("in_chans", 3)))  # released configs say in_chans
        patch_dim = channels * int(config.get("temporal_patch_size", 2)) * self.patch_size**2
        self.patch_embed = PatchEmbed(patch_dim, dim)
        act = config.get("hidden_act", "silu")
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, int(config["intermediate_size"]), act) for _ in range(int(config["depth"]))
        )
        self.merger = PatchMerger(dim, int(config["out_hidden_size"]), self.merge_size)
        self.register_buffer("inv_freq", torch.empty(self.head_dim // 4), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """Rotary frequencies of one axis (again after materialising from the meta device)."""
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        window = self.window_size // self.merge_size // self.patch_size
        layout = vision_layout(tuple(grids), self.merge_size, window, self.inv_freq.device)
        unit = self.merge_size**2
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))
        x = x.view(-1, unit, x.shape[-1])[layout.window_index].view(x.shape)
        freqs = layout.positions.float()[:, :, None] * self.inv_freq  # [patches, 2, head_dim/4]
        freqs = freqs.flatten(1)  # rows then columns, as HF
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [patches, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout.full if i in self.full_blocks else layout.windows)
        return self.merger(x)[layout.reverse_index]


# Cached on the function, not on a method: a method's cache would hold every tower (`self`) alive.
@functools.lru_cache(maxsize=32)
def vision_layout(grids: tuple[tuple[int, int, int], ...], merge: int, window: int, device: torch.device) -> Layout:
    """Window order, positions and attention runs of images with patch grids (t, h, w); `window` is the
    window's side in merged units."""
    window_index, window_lens, frame_lens, positions = [], [], [], []
    base = 0
    for t, h, w in grids:
        rows, cols = h // merge, w // merge
        units = torch.arange(t * rows * cols).view(t, rows, cols)
        for frame in range(t):
            for r in range(0, rows, window):
                for c in range(0, cols, window):
                    block = units[frame, r : r + window, c : c + window].reshape(-1)
                    window_index.append(block + base)
                    window_lens.append(block.numel() * merge * merge)
            frame_lens.append(h * w)
        # (row, column) of each patch in the processor's order: merged unit by unit, 2x2 inside each.
        row = torch.arange(h).view(rows, merge, 1, 1).expand(rows, merge, cols, merge).transpose(1, 2)
        col = torch.arange(w).view(1, 1, cols, merge).expand(rows, merge, cols, merge).transpose(1, 2)
        positions.append(torch.stack([row.reshape(-1), col.reshape(-1)], dim=-1).repeat(t, 1))
        base += t * rows * cols
    order = torch.cat(window_index)
    unit = merge * merge
    patch_order = (order[:, None] * unit + torch.arange(unit)).reshape(-1)
    return Layout(
        window_index=order.to(device),
        reverse_index=torch.argsort(order).to(device),
        positions=torch.cat(positions)[patch_order].to(device),
        full=_segments(frame_lens, device),
        windows=_segments(window_lens, device),
    )


def _segments(lengths: list[int], device: torch.device) -> Segments:
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts.tolist(), lengths):
        by_length.setdefault(length, []).append(start)
    groups = [(torch.tensor(s)[:, None] + torch.arange(n)).to(device) for n, s in by_length.items()]
    return Segments(groups, contiguous=len(groups) == 1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # In float32 as HF, then back to the activations' dtype.
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention within each run: [runs, length, heads, dim] in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
