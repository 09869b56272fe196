#!/usr/bin/env bash
# The one prepared device run (GPU issue 19): correctness first, then every timed target, each
# step under its own timeout, each log written as it comes. About 7 minutes on an H200; run it as
#   BATCHNORM_BENCHMARK_COMMIT=<sha> timeout 480 bash benchmarks/device_run.sh
# with OUT set to where the logs and JSON should go (default benchmarks/results). Every failure
# is printed as it happens; the script goes on with the next step and exits non-zero at the end.
#   bash benchmarks/device_run.sh --dry-run   # on a machine without a GPU: the CPU-runnable
#                                             # steps on tiny inputs under the interpreter
# Expected on the GPU (what each step's last lines should say):
#   launch_check  "launch check: passed"; "direct launcher fast path: True" with compiled entries
#                 for reduce_stats/normalize/reduce_grads/input_grad (results bit-identical over
#                 30 repeats, counters back at 0, CUDA-graph replay equal to eager)
#   gpu_check_*   no FAIL lines, exit 0
#   gpu_overhead  triton direct µs per forward+backward ≤ eager F.batch_norm's (issue target)
#   gpu_host      forward 2 launches / 45 args / 10 allocations, backward 2 / 65 / 8, 0 zero-fills
#   gpu           per row: "kernels" ≤ 4 for ours (split, fwd+bwd), graph fraction ≥ 0.58 at 5S
#                 on shapes ≥ 16 MB; the table printed last
#   sync_gpu      ours vs torch.nn.SyncBatchNorm ratio per world size
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
failed=0
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1

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

PY=${PYTHON:-python}
if [ "$dry" -eq 1 ]; then
  # No GPU: every script that the device run calls must at least start, parse its options and
  # run what it can on CPU tensors in Triton's interpreter (tiny sizes).
  export TRITON_INTERPRET=1
  step dry_launch_check 300 "$PY" benchmarks/triton_launch_check.py --device cpu
  step dry_gpu_check_only 300 "$PY" benchmarks/gpu.py --device cpu --check-only
  step dry_gpu_host 120 "$PY" benchmarks/gpu_host.py --steps 20 --json "$OUT/dry_gpu_host.json"
  for script in gpu_check gpu_overhead gpu sync_gpu; do
    step "dry_${script}_help" 60 "$PY" "benchmarks/$script.py" --help
  done
  exit "$failed"
fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/device.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# 0. The launch machinery on the GPU: direct launcher used, deterministic last-program merges,
#    counters reset, CUDA graphs (before anything is timed).
step launch_check 90 "$PY" benchmarks/triton_launch_check.py
# 1. Correctness against the float64 reference: two sweep shards side by side (compiling is most
#    of their time), the family layers on the first.
step gpu_check_split 150 "$PY" benchmarks/gpu_check.py --arrangement split --dtype float32 &
step gpu_check_bf16 150 "$PY" benchmarks/gpu_check.py --arrangement split --dtype bfloat16 --no-family &
wait
# 2. Host work per step (tiny input, host-bound) and what one step launches, counted with stubs.
step gpu_overhead 60 "$PY" benchmarks/gpu_overhead.py --profile
step gpu_host 60 "$PY" benchmarks/gpu_host.py --json "$OUT/gpu_host.json"
# 3. Every shape, fp32 / bf16 / bf16 channels_last, plain and fused: triton, auto, eager,
#    torch.compile; end to end, by graph replay, host µs, kernels per step; JSON into $OUT.
step gpu 270 "$PY" benchmarks/gpu.py --out "$OUT" --max-seconds 210
# 4. SyncBatchNorm on NCCL against torch.nn.SyncBatchNorm (one card: world size 1 and 2 ranks).
step sync_gpu 60 "$PY" benchmarks/sync_gpu.py --two-ranks
exit "$failed"
