#!/usr/bin/env bash
# One device call that checks a commit and times it (inside scripts/device_run.sh, which installs the
# carried wheels): ferry's benchmark on the given models x workloads (with the per-step profile), then the
# GPU tests, then the sampling kernel against the torch path. Each part has its own time limit, so one
# slow part cannot take the others' time. Writes $OUT/bench.jsonl, $OUT/gpu_tests.log, $OUT/check.log.
# GPU_TESTS: the test files to run (default test_gpu.py; "" for none); SAMPLING="": skip the sampling kernel.
#   bash scripts/device_run.sh bash scripts/device_check.sh "qwen3-0.6b qwen2.5-0.5b" "nanovllm 512x256 decode-heavy"
set -u
models=${1:-"qwen3-0.6b qwen2.5-0.5b"}
workloads=${2:-"nanovllm 512x256 decode-heavy"}
tests=${GPU_TESTS-tests/scheduler_proc/test_gpu.py}  # GPU_TESTS="" skips them
out=${OUT:-/tmp}
log=$out/check.log
nvidia-smi -L | tee -a "$log"
for m in $models; do
  for w in $workloads; do
    extra=""
    [ "$w" = decode-heavy ] && extra="--cuda-graph-max-bs 512"
    timeout 200 python3 scripts/bench_offline_throughput.py --model-path "configs/$m" --load-format dummy \
      --context-length 4096 --workload "$w" --roofline --profile-steps 100000 $extra --tag device_check \
      --result-file "$out/bench.jsonl" >"$out/last.log" 2>&1 || { echo "FAILED $m $w"; tail -5 "$out/last.log"; }
    grep -E "output tok/s|fraction of floor|steps: n|step gpu_ms|step host_ms" "$out/last.log" | sed "s/^/$m $w: /" | tee -a "$log"
  done
done
if [ -n "$tests" ]; then
  timeout 300 python3 -m pytest -rA -s -m gpu $tests -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
  echo "gpu tests exit $?: $(tail -1 "$out/gpu_tests.log")" | tee -a "$log"
fi
[ -n "${SAMPLING-1}" ] && timeout 60 python3 scripts/bench_sampling.py 2>&1 | grep rows | tee -a "$log"
