#!/usr/bin/env bash
# One call on the GPU device machine: install carried wheels, restore the flashinfer JIT cache, run the
# given command, save the JIT cache back under $OUT. Usage: bash scripts/device_run.sh <command...>
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
# The device has no PyPI: the default model's tokenizer (the config-only folders borrow it) is carried.
if [ -d .fi_cache/smollm_tok ]; then mkdir -p ~/.cache/ferry/models && cp -r .fi_cache/smollm_tok ~/.cache/ferry/models/SmolLM2-135M-Instruct; fi
if [ -f .fi_cache/flashinfer.tgz ]; then mkdir -p ~/.cache && tar -xzf .fi_cache/flashinfer.tgz -C ~/.cache; fi
# FERRY_SRC: a clean export of one commit to run (the working tree may hold others' work in progress).
(cd "${FERRY_SRC:-.}" && PYTHONPATH=/tmp/site:$PWD "$@")
status=$?
if [ -n "${OUT:-}" ] && [ -d ~/.cache/flashinfer ]; then tar -czf "$OUT/flashinfer.tgz" -C ~/.cache flashinfer; fi
exit $status
