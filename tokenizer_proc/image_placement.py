"""Where images go in a prompt: generate()'s image_data matched to the prompts, and each prompt's image
placeholder token expanded to its image's tokens, with the image's offset recorded for the scheduler."""

from __future__ import annotations

from typing import Any

from engine.shared.protocol import Array, ImageInput
from tokenizer_proc.images import ImageProcessor, ProcessedImage

_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def images_per_prompt(image_data: Any, count: int, single: bool) -> list[list[tuple[str, Any]]]:
    """generate()'s image_data as (where, image) pairs per prompt. One prompt: an image or a list of
    them; a list of prompts: a list with one entry per prompt, each an image, a list of them or None."""
    if image_data is None:
        return [[] for _ in range(count)]
    if single:
        if isinstance(image_data, (list, tuple)):
            return [[(f"image_data[{i}]", image) for i, image in enumerate(image_data)]]
        return [[("image_data", image_data)]]
    if not isinstance(image_data, (list, tuple)) or len(image_data) != count:
        got = f"{len(image_data)} entries" if isinstance(image_data, (list, tuple)) else type(image_data).__name__
        raise ValueError(
            f"image_data must be a list with one entry (an image, a list of images or None) per "
            f"prompt: {count} prompts, got {got}"
        )
    out = []
    for p, entry in enumerate(image_data):
        if entry is None:
            out.append([])
        elif isinstance(entry, (list, tuple)):
            out.append([(f"image_data[{p}][{i}]", image) for i, image in enumerate(entry)])
        else:
            out.append([(f"image_data[{p}]", entry)])
    return out


def expand_placeholders(
    processor: ImageProcessor, ids: list[int], images: list[ProcessedImage], where: str
) -> tuple[list[int], list[ImageInput]]:
    """ids with each image placeholder token repeated to its image's token count, and the images
    with their offsets in the new ids."""
    found = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    if len(found) != len(images):
        raise ValueError(
            f"{where} has {len(images)} image(s) but the prompt has {len(found)} image "
            f"placeholder(s) ({_PLACEHOLDER}, one per image)"
        )
    out: list[int] = []
    inputs: list[ImageInput] = []
    last = 0
    for position, image in zip(found, images):
        out += ids[last:position]
        pixels = image.pixel_values
        inputs.append(
            ImageInput(
                pixel_values=Array(data=pixels.tobytes(), shape=list(pixels.shape), dtype=str(pixels.dtype)),
                grid_thw=image.grid_thw,
                merge_size=processor.merge_size,
                offset=len(out),
                num_tokens=image.num_tokens,
                content_hash=image.content_hash,
            )
        )
        out += [processor.image_token_id] * image.num_tokens
        last = position + 1
    return out + ids[last:], inputs
