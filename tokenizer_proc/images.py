"""Images for vision-language models, in the frontend: loading every accepted form (file path, bytes,
PIL image, data URL, http(s) URL) and transformers' own Qwen2-VL preprocessing (where their tokens go
in a prompt is image_placement.py). Runs in the caller's thread (several images in the processor's
small thread pool), never on the engine's loop, so a slow image never stalls other requests."""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import io
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

FETCH_TIMEOUT_S = 10.0  # an http(s) image that takes longer is an error for its caller
_MAX_FETCH_BYTES = 64 << 20
_WORKERS = 8


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray  # [num_patches, patch_dim], float32 or float16
    grid_thw: list[int]
    num_tokens: int
    content_hash: int


class ImageProcessor:
    """Turns caller images into the vision tower's patches, with the model's preprocessing settings
    (preprocessor_config.json when the folder has one, else the vision config's patch sizes)."""

    def __init__(self, model_path: str, config: dict[str, Any], pixel_dtype: str = "float32") -> None:
        vision = config["vision_config"]
        self.pixel_dtype = np.dtype(pixel_dtype)
        self.image_token_id = int(config["image_token_id"])
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        processor_class = hf_processor_class()
        if os.path.exists(os.path.join(model_path, "preprocessor_config.json")):
            self.hf = processor_class.from_pretrained(model_path)
        else:
            self.hf = processor_class(
                patch_size=int(vision.get("patch_size", 14)),
                merge_size=self.merge_size,
                temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            )
        # Threads start on first use; the engine's shutdown() ends them through close().
        self._pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="ferry-images")

    def process_iter(self, images: list[tuple[str, Any]]) -> Iterator[ProcessedImage]:
        """(where, image) pairs to processed images, in order, each as soon as it and those before it
        are done (all start at once in a small thread pool); the first bad one raises its error when
        reached. Closing the iterator early cancels the images not started yet."""
        if len(images) <= 1:
            return (self.process(where, image) for where, image in images)
        return self._pool.map(lambda pair: self.process(*pair), images)

    def process(self, where: str, image: Any) -> ProcessedImage:
        pil = load_image(where, image)
        try:
            out = self.hf(images=[pil], return_tensors="np")
        except ValueError as exc:  # e.g. an extreme aspect ratio
            raise ValueError(f"{where} cannot be preprocessed: {exc}") from exc
        pixels = np.ascontiguousarray(out["pixel_values"], dtype=self.pixel_dtype)
        grid = [int(x) for x in out["image_grid_thw"][0]]
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=8, person=b"ferry-img")
        digest.update(np.asarray(grid, dtype=np.int64).tobytes())
        content_hash = int.from_bytes(digest.digest(), "little") >> 1  # fits a signed 64-bit int
        return ProcessedImage(pixels, grid, int(np.prod(grid)) // self.merge_size**2, content_hash)

    def close(self) -> None:
        """Start no more images; those being preprocessed finish, then the pool's threads end."""
        self._pool.shutdown(wait=False)


def image_processor_for(model_path: str, model_dtype: str) -> Optional[ImageProcessor]:
    """The image processor of a vision-language model folder, None for a text-only model. A model in half
    precision gets float16 pixels: its tower computes in 16 bits anyway, and they cross to the
    scheduler in half the bytes."""
    path = os.path.join(model_path, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    if "vision_config" not in config or "image_token_id" not in config:
        return None
    return ImageProcessor(model_path, config, "float32" if model_dtype == "float32" else "float16")


def load_image(where: str, image: Any) -> Any:
    """A PIL RGB image from any accepted form; ValueError/TypeError naming `where` otherwise."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pil = _open(where, bytes(image))
    elif isinstance(image, str):
        pil = _open(where, _read_source(where, image))
    else:
        raise TypeError(
            f"{where} must be a file path, bytes, a PIL image, a data: URL or an http(s) URL, "
            f"got {type(image).__name__}"
        )
    try:
        return pil.convert("RGB")
    except OSError as exc:  # truncated or corrupt pixel data shows only when decoded
        raise ValueError(f"{where} is not a readable image: {exc}") from exc


def _read_source(where: str, source: str) -> bytes:
    if source.startswith("data:"):
        head, comma, payload = source.partition(",")
        if not comma or not head.endswith(";base64"):
            raise ValueError(f"{where} is a data URL without ';base64,' data: {source[:40]!r}...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{where} holds invalid base64 data: {exc}") from exc
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=FETCH_TIMEOUT_S) as response:
                data = response.read(_MAX_FETCH_BYTES + 1)
        except Exception as exc:  # HTTP errors, refused connections, timeouts: all the caller's to fix
            raise ValueError(f"{where}: fetching {source!r} failed: {type(exc).__name__}: {exc}") from exc
        if len(data) > _MAX_FETCH_BYTES:
            raise ValueError(f"{where}: {source!r} is larger than {_MAX_FETCH_BYTES >> 20} MiB")
        return data
    if not os.path.isfile(source):
        raise ValueError(f"{where}: no image file {source!r} (give a file path, a data: URL or an http(s) URL)")
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {source!r}: {exc}") from exc


def _open(where: str, data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        pil = Image.open(io.BytesIO(data))
        pil.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{where} is not a readable image: {exc}") from exc
    return pil


def hf_processor_class() -> Any:
    # The PIL backend needs no torchvision (which cannot be imported beside some torch builds);
    # transformers versions before it have the numpy/PIL one under the plain name.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil
