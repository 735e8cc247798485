#!/usr/bin/env bash
# One call on the GPU device machine: install carried wheels, restore flashinfer's compiled kernels, run the
# given command, save the kernels back under $OUT. Usage: bash scripts/device_run.sh <command...>
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
# The device has no PyPI: the default model's tokenizer (the config-only folders borrow it) is carried.
if [ -d .fi_cache/smollm_tok ]; then mkdir -p ~/.cache/ferry/models && cp -r .fi_cache/smollm_tok ~/.cache/ferry/models/SmolLM2-135M-Instruct; fi
# flashinfer's kernels compiled by earlier calls travel as its prebuilt ("AOT") folder, one .so per kernel
# set, loaded without a build: the whole JIT cache with its build objects is over what a call brings back.
AOT=/tmp/site/flashinfer/data/aot
mkdir -p $AOT
export FERRY_FLASHINFER_AOT=$AOT  # the peer's flashinfer reads it too (scripts/peer_shim/flashinfer_jit_cache)
if compgen -G ".fi_cache/fi_aot.tgz.*" >/dev/null; then cat .fi_cache/fi_aot.tgz.* | tar -xzf - -C $AOT; fi
# Triton's compiled kernels travel too (copy $OUT/triton.tgz.* over .fi_cache/ as well): a fresh machine
# otherwise compiles every variant again, in its first engine start and in each first graph capture.
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
if compgen -G ".fi_cache/triton.tgz.*" >/dev/null; then cat .fi_cache/triton.tgz.* | tar -xzf - -C $TRITON_CACHE_DIR; fi
# FERRY_SRC: a clean export of one commit to run (the working tree may hold others' work in progress).
(cd "${FERRY_SRC:-.}" && PYTHONPATH=/tmp/site:$PWD "$@")
status=$?
# Kernels compiled by this call join the AOT folder, which comes back in pieces of at most 15 MiB (a call
# returns files of up to 16): copy $OUT/fi_aot.tgz.* over .fi_cache/ for the next call.
for so in ~/.cache/flashinfer/*/*/cached_ops/*/*.so; do
  [ -f "$so" ] && mkdir -p "$AOT/$(basename "$so" .so)" && cp "$so" "$AOT/$(basename "$so" .so)/"
done
if [ -n "${OUT:-}" ] && [ -n "$(ls -A $AOT)" ]; then tar -czf - -C $AOT . | split -b 15m - "$OUT/fi_aot.tgz."; fi
if [ -n "${OUT:-}" ] && [ -n "$(ls -A $TRITON_CACHE_DIR)" ]; then
  tar -czf - -C $TRITON_CACHE_DIR . | split -b 15m - "$OUT/triton.tgz."
fi
exit $status
