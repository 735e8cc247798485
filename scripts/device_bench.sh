#!/usr/bin/env bash
# The benchmark rows of docs/benchmarks.md, run on the device (inside scripts/device_run.sh).
# Usage: bash scripts/device_bench.sh <set> ; sets: cells (issue 18's nine cells: the three models, each on one
# engine timing its three workloads, ~255 s on an H200), small (Qwen2.5-0.5B), qwen3 (Qwen3-0.6B), large
# (Llama-3.1-8B), prefix (radix cache on/off), overlap (Qwen2.5-0.5B nanovllm with and without overlap),
# moe (the fused MoE layer against the per-expert loop, then Qwen3-30B-A3B on the three workloads), kernels
# (the Triton decode's tilings at the three models' heads, and the cascade candidate at the prefix workload's), gemm
# (the three models' decode GEMMs: cuBLAS, cuBLASLt and the Triton candidate's tilings, ~2-3 minutes), gemm-fp8
# (the FP8 layers' GEMMs of Llama-3.1-8B and Qwen3-0.6B: torch._scaled_mm, the activations' quantization, Triton).
# The peer's nine cells in the same lease, in a call of their own (~300 s; its first model compiles and
# captures for 90-150 s, so keep less back for the later two than device_peer.sh's default 210 s each):
#   PEER_BUDGET_S=560 PEER_RESERVE_S=110 bash .peer/device_peer.sh qwen3-0.6b qwen2.5-0.5b llama-3.1-8b
set -u
out=${OUT:-/tmp}/bench.jsonl
bench() { timeout 300 python3 scripts/bench_offline_throughput.py --load-format dummy --context-length 4096 \
    --result-file "$out" --tag "${TAG:-}" "$@" 2>"${OUT:-/tmp}/last_err.log" | tail -30 || tail -20 "${OUT:-/tmp}/last_err.log"; }
case "$1" in
  cells)
    for model in qwen3-0.6b qwen2.5-0.5b llama-3.1-8b; do
      bench --model-path configs/$model --workload nanovllm,512x256,decode-heavy --roofline --profile-steps 100000 \
        --cuda-graph-max-bs 512
    done ;;
  small)
    bench --model-path configs/qwen2.5-0.5b --workload 512x256 --roofline --baseline hf
    bench --model-path configs/qwen2.5-0.5b --workload nanovllm --roofline --baseline hf
    bench --model-path configs/qwen2.5-0.5b --workload decode-heavy --roofline --cuda-graph-max-bs 512 --profile-steps 50000 ;;
  qwen3)
    bench --model-path configs/qwen3-0.6b --workload 512x256 --roofline
    bench --model-path configs/qwen3-0.6b --workload nanovllm --roofline
    bench --model-path configs/qwen3-0.6b --workload decode-heavy --roofline --cuda-graph-max-bs 512 ;;
  overlap)
    bench --model-path configs/qwen2.5-0.5b --workload nanovllm --roofline --profile-steps 50000
    bench --model-path configs/qwen2.5-0.5b --workload nanovllm --roofline --profile-steps 50000 --disable-overlap-schedule ;;
  large)
    bench --model-path configs/llama-3.1-8b --workload 512x256 --roofline
    bench --model-path configs/llama-3.1-8b --workload nanovllm --roofline
    bench --model-path configs/llama-3.1-8b --workload decode-heavy --roofline --cuda-graph-max-bs 512 ;;
  moe)
    timeout 300 python3 scripts/bench_moe.py --result-file "$out"
    bench --model-path configs/qwen3-30b-a3b --workload 512x256 --roofline
    bench --model-path configs/qwen3-30b-a3b --workload nanovllm --roofline
    bench --model-path configs/qwen3-30b-a3b --workload decode-heavy --roofline --cuda-graph-max-bs 512 ;;
  prefix)
    bench --model-path configs/qwen2.5-0.5b --workload prefix --roofline --profile-steps 100000
    bench --model-path configs/qwen2.5-0.5b --workload prefix --roofline --profile-steps 100000 --disable-radix-cache ;;
  kernels)
    for heads in "14 2 64" "16 8 128" "32 8 128"; do  # Qwen2.5-0.5B, Qwen3-0.6B, Llama-3.1-8B
      set -- $heads
      timeout 150 python3 scripts/bench_triton_decode.py --heads $1 --kv-heads $2 --head-dim $3 --out "$out"
    done
    timeout 150 python3 scripts/bench_triton_decode.py --heads 14 --kv-heads 2 --head-dim 64 --cascade --out "$out" ;;
  gemm)
    timeout 300 python3 scripts/bench_gemm.py --out "$out" ;;
  gemm-fp8)
    timeout 300 python3 scripts/bench_gemm.py --fp8 --out "$out" ;;
esac
