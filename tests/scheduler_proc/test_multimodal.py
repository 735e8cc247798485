"""The scheduler's side of images alone: M-RoPE positions, prefix-cache keys of image tokens, the admission
policy seeing them, and what a step (decode, or a chunk cutting an image) passes to the model."""

from __future__ import annotations

import numpy as np
import torch

from engine.shared.protocol import Array, GenerateRequest, ImageInput
from engine.shared.sampling import SamplingParams
from scheduler_proc.forward_batch import ForwardBatch
from scheduler_proc.multimodal import mrope_positions
from scheduler_proc.policy import PrefillingRequests
from scheduler_proc.request import Request
from scheduler_proc.step import attach_images

PAD = 99


def image(offset: int, rows: int, cols: int, content_hash: int) -> ImageInput:
    """An image of rows x cols merged patches (2x2 patches each) whose tokens start at offset."""
    pixels = np.zeros((rows * cols * 4, 3), dtype=np.float32)
    return ImageInput(
        pixel_values=Array(pixels.tobytes(), list(pixels.shape), "float32"),
        grid_thw=[1, 2 * rows, 2 * cols],
        merge_size=2,
        offset=offset,
        num_tokens=rows * cols,
        content_hash=content_hash,
    )


def request(rid: str, images: list[ImageInput], length: int) -> Request:
    ids = list(range(1, length + 1))
    for img in images:
        ids[img.offset : img.offset + img.num_tokens] = [PAD] * img.num_tokens
    msg = GenerateRequest(rid=rid, input_ids=ids, sampling=SamplingParams(max_new_tokens=4), images=images)
    return Request(msg, seed=0)


def test_mrope_positions_of_text_image_text():
    # 2 text tokens, a 2x3 image (6 tokens), 2 text tokens.
    positions, delta = mrope_positions(10, [image(2, 2, 3, 7)])
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],  # time: the image's start
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],  # row
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],  # column; the text after resumes at start + the largest side
    ]
    assert delta == 7 - 10  # the next token sits at position 7, KV position 10


def test_image_tokens_are_keyed_by_their_pixels():
    same_a, same_b = request("a", [image(2, 2, 2, 5)], 8), request("b", [image(2, 2, 2, 5)], 8)
    other = request("c", [image(2, 2, 2, 6)], 8)  # same size, other pixels
    assert same_a.cache_tokens(0, 8) == same_b.cache_tokens(0, 8)
    assert other.cache_tokens(0, 8)[:2] == same_a.cache_tokens(0, 8)[:2]
    assert other.cache_tokens(2, 8) != same_a.cache_tokens(2, 8)
    assert all(t < 0 for t in same_a.cache_tokens(2, 6))  # never a real token id
    assert same_a.tokens(2, 6) == [PAD] * 4  # the model still reads the image token


def test_a_prefilling_request_with_another_image_is_not_worth_waiting_for():
    images = [image(2, 6, 6, 5)]  # 36 image tokens: more than the policy's minimum gain
    running = request("running", images, 48)
    assert PrefillingRequests([running]).worth_waiting_for(request("same image", images, 48), 0)
    assert not PrefillingRequests([running]).worth_waiting_for(request("other image", [image(2, 6, 6, 6)], 48), 0)


def _batch(entries) -> ForwardBatch:
    positions = torch.cat([torch.arange(r.kv_len, r.kv_len + n) for r, n in entries])
    return ForwardBatch(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=positions,
        out_cache_loc=positions,
        req_pool_indices=torch.zeros(len(entries), dtype=torch.int64),
        prefix_lens_cpu=[r.kv_len for r, _ in entries],
        extend_lens_cpu=[n for _, n in entries],
        logit_rows=positions,
        is_decode=all(n == 1 for _, n in entries),
    )


def test_a_chunk_cutting_an_image_gets_3d_positions_and_its_rows_of_the_image():
    req, text = request("r", [image(2, 2, 3, 7)], 10), request("t", [], 4)
    req.kv_len = 4  # the chunk [4, 9): image tokens 2..5, then one text token
    batch = _batch([(text, 4), (req, 5)])
    attach_images(batch, [(text, 4), (req, 5)])
    assert batch.rope_positions.tolist() == [
        [0, 1, 2, 3, 2, 2, 2, 2, 5],
        [0, 1, 2, 3, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5],
    ]
    [part] = batch.image_parts
    assert (part.index, part.start, part.end, part.row) == (0, 2, 6, 4)


def test_decode_steps_get_plain_positions_shifted_by_each_request_delta():
    req, text = request("r", [image(2, 2, 3, 7)], 10), request("t", [], 4)
    req.output_ids, text.output_ids = [5], [5]
    req.kv_len, text.kv_len = 10, 4
    batch = _batch([(req, 1), (text, 1)])
    attach_images(batch, [(req, 1), (text, 1)])
    assert batch.rope_positions.tolist() == [7, 4] and batch.image_parts == []  # [T]: CUDA graphs replay it
