"""Images inside the scheduler: a request's M-RoPE positions and prefix-cache keys, and the parts of
a step that put vision embeddings in place of image tokens (placed in a step by step.py).

M-RoPE positions (Qwen2-VL): text tokens count up by one on all three rows; an image's tokens take
(time, row, column) of their merged patch, offset by the position where the image starts; the text
after it resumes at that start + the image's largest side. Tokens past the prompt sit at their KV
position + `delta` (the prompt's last position + 1 - its length).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.shared.protocol import ImageInput


class RequestImages:
    """A request's images, their M-RoPE positions and cache keys, and the vision embeddings computed
    for it (kept from the step that first needs an image until its prefill has passed it)."""

    def __init__(self, images: list[ImageInput], input_ids: list[int]) -> None:
        self.images = images
        self.positions, self.delta = mrope_positions(len(input_ids), images)
        self.first = images[0].offset
        self.end = images[-1].offset + images[-1].num_tokens  # past the last image token
        self.cache_ids = cache_key_ids(input_ids, images)
        self.embeds: dict[int, torch.Tensor] = {}

    def needs_3d(self, start: int, end: int) -> bool:
        """Whether tokens [start, end) include image tokens (whose three positions differ)."""
        return (
            start < self.end
            and end > self.first
            and any(img.offset < end and img.offset + img.num_tokens > start for img in self.images)
        )

    def shift(self, start: int) -> int:
        """Rope position - KV position of text token `start` (constant along a run of text)."""
        if start >= self.positions.shape[1]:
            return self.delta
        return int(self.positions[0, start]) - start

    def rope_positions(self, start: int, end: int) -> np.ndarray:
        """[3, end - start] positions of tokens [start, end), prompt and beyond."""
        length = self.positions.shape[1]
        if end <= length:
            return self.positions[:, start:end]
        tail = np.arange(max(start, length), end, dtype=np.int64) + self.delta
        head = self.positions[:, start:length] if start < length else np.empty((3, 0), dtype=np.int64)
        return np.concatenate([head, np.broadcast_to(tail, (3, tail.size))], axis=1)

    def parts(self, start: int, end: int, row: int) -> list[ImagePart]:
        """The image rows among tokens [start, end), which a step packs from row `row` on."""
        parts = []
        for index, image in enumerate(self.images):
            first, last = max(start, image.offset), min(end, image.offset + image.num_tokens)
            if first < last:
                parts.append(ImagePart(self, index, first - image.offset, last - image.offset, row + first - start))
        return parts

    def pixels(self, index: int) -> torch.Tensor:
        array = self.images[index].pixel_values
        return torch.from_numpy(np.frombuffer(array.data, dtype=array.dtype).reshape(array.shape).copy())


@dataclass
class ImagePart:
    """Rows [start, end) of one image's embeddings, placed at packed rows row.. of a step."""

    owner: RequestImages
    index: int
    start: int
    end: int
    row: int


def mrope_positions(length: int, images: list[ImageInput]) -> tuple[np.ndarray, int]:
    """([3, length] positions of a prompt with these images, delta of the tokens after it)."""
    positions = np.empty((3, length), dtype=np.int64)
    next_pos, done = 0, 0
    for image in images:
        text = image.offset - done
        positions[:, done : image.offset] = np.arange(next_pos, next_pos + text)
        next_pos += text
        t, h, w = image.grid_thw[0], image.grid_thw[1] // image.merge_size, image.grid_thw[2] // image.merge_size
        grid = np.indices((t, h, w)).reshape(3, -1)
        positions[:, image.offset : image.offset + image.num_tokens] = grid + next_pos
        next_pos += max(t, h, w)
        done = image.offset + image.num_tokens
    positions[:, done:] = np.arange(next_pos, next_pos + length - done)
    return positions, next_pos - done


def cache_key_ids(input_ids: list[int], images: list[ImageInput]) -> list[int]:
    """input_ids with each image's tokens replaced by a key derived from its pixels (negative, so never a
    real token): the same image shares its KV in the prefix cache, another image of its size does not."""
    keys = list(input_ids)
    for image in images:
        keys[image.offset : image.offset + image.num_tokens] = [-1 - image.content_hash] * image.num_tokens
    return keys


def image_embeddings(parts: list[ImagePart], encode, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [N, H], packed rows [N]) of a step's image parts. Images not yet embedded for their
    request go through `encode(pixels, grids)` together; an image's embeddings are dropped once its
    last rows are placed (chunked prefill has then passed it)."""
    missing = [(p.owner, p.index) for p in parts if p.index not in p.owner.embeds]
    if missing:
        pixels = torch.cat([owner.pixels(i) for owner, i in missing]).to(device, non_blocking=True)
        grids = [tuple(owner.images[i].grid_thw) for owner, i in missing]
        out = encode(pixels, grids)
        for (owner, i), piece in zip(missing, out.split([owner.images[i].num_tokens for owner, i in missing])):
            owner.embeds[i] = piece
    rows = torch.cat([p.owner.embeds[p.index][p.start : p.end] for p in parts])
    where = torch.cat([torch.arange(p.row, p.row + p.end - p.start) for p in parts]).to(device, non_blocking=True)
    for p in parts:
        if p.end == p.owner.images[p.index].num_tokens:
            del p.owner.embeds[p.index]
    return rows, where
