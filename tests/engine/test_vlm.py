"""Vision-language inference on a tiny random-weight Qwen2.5-VL built with HF transformers: greedy ids equal
HF's (float32) for image, multi-image, other-size and text-only prompts, batched and alone, with chunked
prefill cutting through images; every image form gives the same ids; the prefix cache reuses an image's
KV only for the same image; hidden states and logprobs of image prompts; chat content parts, through
the engine and the OpenAI server; shutdown ends the engine's image threads."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch
from reference import assert_pool_free
from vlm_reference import (
    PLACEHOLDER,
    ImageServer,
    expand,
    hf_vlm_greedy,
    image_processor,
    png_bytes,
    random_image,
    tiny_vlm_dir,
)

from engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
IMAGE_A = random_image(56, 56, seed=1)  # 2x2 merged patches: 4 tokens, one attention window
IMAGE_B = random_image(84, 112, seed=2)  # 3x4 merged: 12 tokens, windows of unequal sizes
IMAGE_C = random_image(112, 84, seed=3)  # another size: 4x3 merged
IMAGE_A2 = random_image(56, 56, seed=4)  # IMAGE_A's size, other pixels


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


CASES = {
    "one image": (user(f"What is in {PLACEHOLDER}?"), [IMAGE_A]),
    "two images": (user(f"Compare {PLACEHOLDER} with {PLACEHOLDER}, please."), [IMAGE_A, IMAGE_B]),
    "another size": (user(f"{PLACEHOLDER} Describe it."), [IMAGE_C]),
    "text only": (user("Tell me about the sea."), []),
}


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, default_model_path):
    return tiny_vlm_dir(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", default_model_path)


@pytest.fixture(scope="module")
def hf_vlm(vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vlm_tokenizer(vlm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vlm_dir)


@pytest.fixture(scope="module")
def references(hf_vlm, vlm_tokenizer):
    return {name: hf_vlm_greedy(hf_vlm, vlm_tokenizer, prompt, images, 16) for name, (prompt, images) in CASES.items()}


@pytest.fixture(scope="module")
def engine(vlm_dir):
    with Engine(vlm_dir, max_total_tokens=16384) as e:
        yield e


@pytest.fixture(scope="module")
def chunked(vlm_dir):
    # 5-token chunks: every image of CASES is cut, some several times.
    with Engine(vlm_dir, max_total_tokens=16384, chunked_prefill_size=5) as e:
        yield e


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer({"a.png": png_bytes(IMAGE_A)})
    yield server
    server.close()


def _image_data(images: list):
    return None if not images else images[0] if len(images) == 1 else images


def test_greedy_ids_equal_hf_in_one_batch_and_alone(engine, references):
    prompts = [prompt for prompt, _ in CASES.values()]
    outs = engine.generate(prompts, GREEDY, image_data=[_image_data(images) for _, images in CASES.values()])
    assert [o["output_ids"] for o in outs] == list(references.values())
    for name, (prompt, images) in CASES.items():
        assert engine.generate(prompt, GREEDY, image_data=images or None)["output_ids"] == references[name], name
    assert_pool_free(engine)


def test_chunked_prefill_through_images_equals_hf(chunked, references):
    prompts = [prompt for prompt, _ in CASES.values()]
    outs = chunked.generate(prompts, GREEDY, image_data=[images or None for _, images in CASES.values()])
    assert [o["output_ids"] for o in outs] == list(references.values())
    chunked.flush_cache()
    for name, (prompt, images) in CASES.items():  # alone, and each computed afresh in chunks
        out = chunked.generate(prompt, GREEDY, image_data=images or None)
        assert out["output_ids"] == references[name], name
    assert_pool_free(chunked)


def test_every_image_form_gives_the_same_ids(engine, references, image_server, tmp_path):
    prompt = CASES["one image"][0]
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(IMAGE_A))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE_A)).decode()
    engine.flush_cache()
    first = engine.generate(prompt, GREEDY, image_data=IMAGE_A)
    assert first["output_ids"] == references["one image"]
    assert first["meta_info"]["cached_tokens"] == 0
    for form in (str(path), png_bytes(IMAGE_A), data_url, f"{image_server.url}/a.png", [IMAGE_A]):
        out = engine.generate(prompt, GREEDY, image_data=form)
        assert out["output_ids"] == references["one image"], type(form)
        # The same pixels, however given: the whole prompt but its last token comes from the cache.
        assert out["meta_info"]["cached_tokens"] == out["meta_info"]["prompt_tokens"] - 1


def test_a_different_image_of_the_same_size_never_reuses_the_cached_one(engine, hf_vlm, vlm_tokenizer):
    prompt = user(f"Look: {PLACEHOLDER} What colour dominates?")
    text_before = len(vlm_tokenizer(prompt.split(PLACEHOLDER)[0] + "<|vision_start|>")["input_ids"])
    first = engine.generate(prompt, GREEDY, image_data=IMAGE_A)
    other = engine.generate(prompt, GREEDY, image_data=IMAGE_A2)
    assert other["meta_info"]["cached_tokens"] == text_before  # the text before the image, not the image
    assert first["output_ids"] == hf_vlm_greedy(hf_vlm, vlm_tokenizer, prompt, [IMAGE_A], 16)
    assert other["output_ids"] == hf_vlm_greedy(hf_vlm, vlm_tokenizer, prompt, [IMAGE_A2], 16)
    assert other["output_ids"] != first["output_ids"]  # the images matter to this model
    again = engine.generate(prompt, GREEDY, image_data=IMAGE_A2)
    assert again["meta_info"]["cached_tokens"] == again["meta_info"]["prompt_tokens"] - 1
    assert again["output_ids"] == other["output_ids"]


@torch.inference_mode()
def test_hidden_states_and_logprobs_of_an_image_prompt(engine, hf_vlm, vlm_tokenizer):
    prompt, images = CASES["two images"]
    processed = image_processor()(images=images, return_tensors="pt")
    ids = expand(vlm_tokenizer(prompt)["input_ids"], processed["image_grid_thw"].tolist(), hf_vlm.config.image_token_id)
    hf_vlm.model.rope_deltas = None
    input_ids = torch.tensor([ids])
    hf_logprobs = torch.log_softmax(
        hf_vlm(
            input_ids,
            pixel_values=processed["pixel_values"],
            image_grid_thw=processed["image_grid_thw"],
            mm_token_type_ids=(input_ids == hf_vlm.config.image_token_id).int(),
        ).logits[0],
        dim=-1,
    )
    out = engine.generate(
        prompt,
        {"temperature": 0, "max_new_tokens": 2},
        image_data=images,
        return_logprob=True,
        logprob_start_len=0,
        return_hidden_states=True,
    )
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    got = meta["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids
    want = hf_logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([lp for lp, _, _ in got[1:]]), want, atol=1e-4)
    hidden = meta["hidden_states"][0]
    assert hidden.shape == (len(ids), hf_vlm.config.text_config.hidden_size)
    # Final-normed states: HF's LM head over them gives HF's own logits.
    assert torch.allclose(torch.log_softmax(hf_vlm.lm_head(hidden), dim=-1), hf_logprobs, atol=1e-4)


def test_chat_takes_openai_image_parts(engine, references):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE_A)).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in "},
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "?"},
            ],
        }
    ]
    assert engine.chat(messages, GREEDY)["output_ids"] == references["one image"]
    two = [messages, [{"role": "user", "content": "Tell me about the sea."}]]
    assert [o["output_ids"] for o in engine.chat(two, GREEDY)] == [references["one image"], references["text only"]]

    async def both():
        chat = await engine.async_chat(messages, GREEDY)
        generated = await engine.async_generate(CASES["two images"][0], GREEDY, image_data=[IMAGE_A, IMAGE_B])
        return chat["output_ids"], generated["output_ids"]

    assert asyncio.run(both()) == (references["one image"], references["two images"])


def test_openai_server_chat_with_image_url(engine, references, image_server):
    from starlette.testclient import TestClient

    from engine.server.app import build_app
    from engine.server.service import ServerSettings, Service

    service = Service(ServerSettings(), {})
    service.engine, service.model_name = engine, "tiny-vl"  # the module's engine, no second one
    client = TestClient(build_app(service))
    parts = [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": f"{image_server.url}/a.png"}},
        {"type": "text", "text": "?"},
    ]
    body = {
        "model": "tiny-vl",
        "messages": [{"role": "user", "content": parts}],
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": True,
    }
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    expected = engine.tokenizer.decode(references["one image"], skip_special_tokens=True)
    assert reply.json()["choices"][0]["message"]["content"] == expected
    parts[1]["image_url"]["url"] = "/etc/hostname"  # the server reads no files for its clients
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    parts[1]["image_url"]["url"] = f"{image_server.url}/missing.png"
    failed = client.post("/v1/chat/completions", json=body)
    assert failed.status_code == 400 and failed.json()["error"]["param"] == "messages"
    assert "404" in failed.json()["error"]["message"]


def test_shutdown_ends_the_engines_image_threads(vlm_dir):
    import threading

    def image_threads() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("ferry-images")}

    others = image_threads()  # other engines' pools (this module's engine) are not this one's
    with Engine(vlm_dir, max_total_tokens=16384) as e:
        e.generate(user(f"{PLACEHOLDER} and {PLACEHOLDER}"), {"max_new_tokens": 1}, image_data=[IMAGE_A, IMAGE_B])
        mine = image_threads() - others
        assert mine  # two images are preprocessed in the pool
    for thread in mine:
        thread.join(timeout=5)
    assert not any(thread.is_alive() for thread in mine)
