#!/usr/bin/env bash
# The one prepared device run (GPU issue): correctness first, then every timed target, each step
# under its own timeout, each log written as it comes. About 7 minutes on an H200; run it as
#   BATCHNORM_BENCHMARK_COMMIT=<sha> timeout 480 bash benchmarks/device_run.sh
# with OUT set to where the logs and JSON should go (default benchmarks/results). Every failure
# is printed as it happens; the script goes on with the next step and exits non-zero at the end.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
failed=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under timeout, log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  tail -n 40 "$OUT/$name.log"
  echo "== $name: exit $status"
  [ "$status" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# 1. Correctness against the float64 reference: two sweep shards side by side (compiling is most
#    of their time), the family layers on the first.
step gpu_check_split 150 python benchmarks/gpu_check.py --arrangement split --dtype float32 &
step gpu_check_bf16 150 python benchmarks/gpu_check.py --arrangement split --dtype bfloat16 --no-family &
wait
# 2. Host work per step (tiny input, host-bound) and what one step launches, counted with stubs.
step gpu_overhead 60 python benchmarks/gpu_overhead.py --profile
step gpu_host 60 python benchmarks/gpu_host.py --json "$OUT/gpu_host.json"
# 3. Every shape, fp32 / bf16 / bf16 channels_last, plain and fused: triton, auto, eager,
#    torch.compile; end to end, by graph replay, host µs, kernels per step; JSON into $OUT.
step gpu 300 python benchmarks/gpu.py --out "$OUT" --max-seconds 240
# 4. SyncBatchNorm on NCCL against torch.nn.SyncBatchNorm (one card: world size 1 and 2 ranks).
step sync_gpu 60 python benchmarks/sync_gpu.py --two-ranks
exit "$failed"
