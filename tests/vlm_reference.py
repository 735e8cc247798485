"""A tiny random-weight Qwen2.5-VL built with HF transformers, and HF's greedy decoding of it as the judge."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from reference import hf_greedy

VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}" + PLACEHOLDER + "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MERGE = 2


def tiny_vlm_dir(out, tokenizer_dir: str, head_dim: int = 16) -> str:
    """A Qwen2.5-VL folder: 2 decoder layers of 4 heads of head_dim (flashinfer needs 64 or more), a 3-block
    vision tower (block 1 full attention, windows of 2x2 merged patches elsewhere), the default model's
    tokenizer with Qwen's vision tokens added."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = vlm_tokenizer(tokenizer_dir)
    ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    unit = head_dim // 16  # time, height, width bands of the head_dim / 2 frequencies: 1/4, 3/8, 3/8, as Qwen's
    section = [2 * unit, 3 * unit, 3 * unit]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=49160,
            hidden_size=4 * head_dim,
            intermediate_size=8 * head_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=4 * head_dim,
            patch_size=14,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        vision_start_token_id=ids[0],
        image_token_id=ids[1],
        vision_end_token_id=ids[2],
        video_token_id=ids[3],
        tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float()
    with torch.no_grad():  # larger-than-init weights so that tokens differ by position and content
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def vlm_tokenizer(tokenizer_dir: str):
    """The default model's tokenizer with Qwen's vision tokens added and a chat template that places images."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def image_processor():
    from tokenizer_proc.images import hf_processor_class

    return hf_processor_class()(patch_size=14, merge_size=MERGE, temporal_patch_size=2)


def random_image(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def expand(ids: list[int], grids: list[list[int]], image_token_id: int) -> list[int]:
    """Each image placeholder repeated to its image's token count, written out independently of ferry."""
    out, grids = [], iter(grids)
    for token in ids:
        out += [token] * (int(np.prod(next(grids))) // MERGE**2 if token == image_token_id else 1)
    return out


@torch.inference_mode()
def hf_vlm_greedy(model, tokenizer, prompt: str, images: list, num_tokens: int) -> list[int]:
    """HF's greedy continuation of a prompt with its images (never stopping at EOS)."""
    image_token_id = model.config.image_token_id
    ids = tokenizer(prompt)["input_ids"]
    kwargs = {}
    if images:
        processed = image_processor()(images=images, return_tensors="pt")
        ids = expand(ids, processed["image_grid_thw"].tolist(), image_token_id)
        kwargs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
    input_ids = torch.tensor([ids])
    if images and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == image_token_id).int()  # transformers 5 places M-RoPE by these
    model.model.rope_deltas = None  # HF keeps the last prompt's delta on the model
    return hf_greedy(model, ids, num_tokens, **kwargs)


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: every form of the image decodes to the same pixels
    return buffer.getvalue()


class ImageServer:
    """A loopback HTTP server in a thread: GET /<name> answers files[name]; /slow answers after 3 s; else 404."""

    def __init__(self, files: dict[str, bytes]) -> None:
        import http.server
        import threading
        import time

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow":
                    time.sleep(3)
                data = files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
