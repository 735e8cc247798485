"""Bad images are the caller's error: a ValueError (TypeError for a wrong kind of value) naming image_data,
raised to that caller alone; the engine serves the next request as before."""

from __future__ import annotations

import socket

import pytest
from reference import assert_pool_free
from vlm_reference import PLACEHOLDER, ImageServer, hf_vlm_greedy, png_bytes, random_image, tiny_vlm_dir

import tokenizer_proc.images
from engine import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
IMAGE = random_image(56, 56, seed=1)
GOOD = f"<|im_start|>user\nWhat is in {PLACEHOLDER}?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, default_model_path):
    return tiny_vlm_dir(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", default_model_path)


@pytest.fixture(scope="module")
def good_ids(vlm_dir):
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    return hf_vlm_greedy(model, AutoTokenizer.from_pretrained(vlm_dir), GOOD, [IMAGE], 8)


@pytest.fixture(scope="module")
def engine(vlm_dir):
    with Engine(vlm_dir, max_total_tokens=16384) as e:
        yield e


@pytest.fixture(scope="module")
def image_server():
    server = ImageServer({"a.png": png_bytes(IMAGE)})
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are words, not pixels")
    return str(path)


BAD = {
    "missing file": (GOOD, lambda ctx: "/nonexistent/dir/cat.png", "no image file"),
    "unreadable file": (GOOD, lambda ctx: ctx["not_an_image"], "not a readable image"),
    "truncated bytes": (GOOD, lambda ctx: png_bytes(IMAGE)[:60], "not a readable image"),
    "bad base64": (GOOD, lambda ctx: "data:image/png;base64,@@not*base64@@", "invalid base64"),
    "data url without base64": (GOOD, lambda ctx: "data:image/png,rawbytes", "base64"),
    "url answering 404": (GOOD, lambda ctx: f"{ctx['server']}/missing.png", "404"),
    "url refusing connection": (GOOD, lambda ctx: f"http://127.0.0.1:{_closed_port()}/a.png", "fetching"),
    "url too slow": (GOOD, lambda ctx: f"{ctx['server']}/slow", "timed out"),
    "more images than placeholders": (GOOD, lambda ctx: [IMAGE, IMAGE], "2 image(s) but the prompt has 1"),
    "fewer images than placeholders": (GOOD + PLACEHOLDER, lambda ctx: IMAGE, "1 image(s) but the prompt has 2"),
    "placeholder without image_data": (GOOD, lambda ctx: None, "0 image(s) but the prompt has 1"),
    "image too large for the context": (GOOD, lambda ctx: random_image(1200, 1200, seed=5), "context length"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_data_is_a_value_error_and_the_engine_keeps_serving(
    case, engine, good_ids, image_server, not_an_image, monkeypatch
):
    prompt, make, words = BAD[case]
    monkeypatch.setattr(tokenizer_proc.images, "FETCH_TIMEOUT_S", 1.0)  # the slow URL answers after 3 s
    image = make({"server": image_server.url, "not_an_image": not_an_image})
    params = dict(GREEDY, max_new_tokens=1500) if case.startswith("image too large") else GREEDY
    with pytest.raises(ValueError, match="image_data") as error:
        engine.generate(prompt, params, image_data=image)
    assert words in str(error.value)
    assert engine.generate(GOOD, GREEDY, image_data=IMAGE)["output_ids"] == good_ids
    assert_pool_free(engine)


def test_bad_image_in_a_batch_fails_the_call_before_anything_runs(engine, good_ids):
    with pytest.raises(ValueError, match=r"image_data\[1\]"):
        engine.generate([GOOD, GOOD], GREEDY, image_data=[IMAGE, "/nonexistent.png"])
    with pytest.raises(ValueError, match="one entry .* per prompt"):
        engine.generate([GOOD, GOOD], GREEDY, image_data=[IMAGE])
    with pytest.raises(TypeError, match="image_data"):
        engine.generate(GOOD, GREEDY, image_data=12345)
    assert engine.get_server_info()["num_running"] == 0
    outs = engine.generate([GOOD, GOOD], GREEDY, image_data=[IMAGE, IMAGE])
    assert [o["output_ids"] for o in outs] == [good_ids, good_ids]


def test_image_data_for_a_text_model_is_a_value_error(default_model_path):
    from transformers import AutoTokenizer

    from tokenizer_proc.inputs import GenerateInput, Limits, prepare

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    call = GenerateInput(prompt="Hi", image_data=IMAGE)
    with pytest.raises(ValueError, match="image_data .* takes no images"):
        prepare(tokenizer, Limits(49152, 2048, 4096), call, image_processor=None)


def test_a_long_image_batch_runs_while_later_images_load_and_a_late_bad_one_aborts_it(engine, good_ids, image_server):
    """Image batches go out in slices as their images are ready: the scheduler works on the first
    prompts while a slow image (3 s, then 404) loads; when it fails, the call raises naming it and
    the requests already sent are aborted at once (each would otherwise decode 1,900 tokens)."""
    import threading
    import time

    images = [IMAGE] * 17 + [f"{image_server.url}/slow"] + [IMAGE] * 2
    params = dict(GREEDY, max_new_tokens=1900)
    seen, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            info = engine.get_server_info()
            seen.append(info["num_running"] + info["num_waiting"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(ValueError, match=r"image_data\[17\]") as error:
            engine.generate([GOOD] * len(images), params, image_data=images)
    finally:
        done.set()
        watcher.join()
    assert "404" in str(error.value)
    assert max(seen) >= 16  # the first slice was in the scheduler before the call failed
    deadline = time.monotonic() + 5.0
    while (info := engine.get_server_info())["num_running"] + info["num_waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert info["num_running"] + info["num_waiting"] == 0  # aborted, not decoding on
    assert engine.generate(GOOD, GREEDY, image_data=IMAGE)["output_ids"] == good_ids
    assert_pool_free(engine)
