#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels the GPU device machine lacks (Python 3.12, manylinux x86-64)
# into .whl/ (git-ignored). The device already has torch, transformers, numpy, safetensors, tokenizers.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$@"
}
get flashinfer-python==0.5.3 apache-tvm-ffi nvidia-cudnn-frontend
get pyzmq msgspec gguf  # the device image has uvloop, tqdm and pillow
get xgrammar pydantic pydantic-core annotated-types typing-inspection  # structured output (json_schema, regex, ebnf)
ls -la .whl
# The device has no PyPI either: the config-only model folders borrow the default model's tokenizer, which
# scripts/device_run.sh installs from .fi_cache/smollm_tok (carry .fi_cache). `make model` downloads it here.
tok=$HOME/.cache/ferry/models/SmolLM2-135M-Instruct
if [ -f "$tok/tokenizer.json" ]; then
  mkdir -p .fi_cache/smollm_tok
  for f in tokenizer.json tokenizer_config.json config.json generation_config.json chat_template.jinja; do
    if [ -f "$tok/$f" ]; then cp "$tok/$f" .fi_cache/smollm_tok/; fi
  done
else
  echo "no default model in $tok: run 'make model', then this again, for the tokenizer the device borrows"
fi
