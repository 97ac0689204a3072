#!/usr/bin/env bash
# make gpu-check: everything a GPU can tell us, in one call, within 9 minutes on an H100/H200 machine that has
# torch, triton, nvcc and ninja but no network and nothing of ours installed.
#
#   1. builds the extension with the CUDA kernels for the GPU found (all cores, TORCH_CUDA_ARCH_LIST set to it)
#   2. longkernels info
#   3. the GPU tests (pytest -m gpu, as parallel shards), and the op checks on CUDA tensors
#   4. longkernels check on CUDA tensors (every backend against the reference)
#   5. a short benchmark of every operation against its peers on the GPU (JSON and PNG named by the device)
#   6. ring attention on one GPU (W = 1): its overhead against plain memory attention
#
# Each step has a time limit taken from what is left of the budget (GPU_CHECK_BUDGET_S, default 540 s), a
# failing step does not stop the later ones, and a table of the steps comes last. Results and logs go to
# GPU_CHECK_OUT (default: $OUT where the device tool sets it, else bench/results).
#
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU (quick benchmark, CPU build): it tests this script's own
# plumbing on a machine without a GPU, so that a lent GPU's minutes are not spent on a typo here. Its output
# goes to longkernels-bench/gpu-check-dry-run (ignored by git), not among the committed figures.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ "${GPU_CHECK_DRY_RUN:-0}" == "1" ]]; then
  OUTDIR=${GPU_CHECK_OUT:-longkernels-bench/gpu-check-dry-run}
else
  OUTDIR=${GPU_CHECK_OUT:-${OUT:-bench/results}}
fi
BUDGET=${GPU_CHECK_BUDGET_S:-540}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
start=$(date +%s)
declare -a SUMMARY

DEV=cuda
LEVEL=()
CHECK=()
CP_LEVEL=(--lengths 8192)
if [[ "${GPU_CHECK_DRY_RUN:-0}" == "1" ]]; then
  DEV=cpu
  LEVEL=(--quick --ops reversible_coupling,reversible)
  CHECK=(--ops lsh_attention --backends cpu)
  CP_LEVEL=(--lengths 4096 --dtypes float32)
  device=dry-run-cpu
  arch=none
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: torch sees no CUDA device here; nothing to check (GPU_CHECK_DRY_RUN=1 tests this script)" >&2
  exit 2
else
  device=$("$PYTHON" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
  arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
fi
LOG="$OUTDIR/gpu_check_${device}.log"
: > "$LOG"
echo "gpu-check on $device (sm ${arch}), budget ${BUDGET}s, results in $OUTDIR" | tee -a "$LOG"

# step NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and the budget left.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - start) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    SUMMARY+=("$(printf '%-12s %-8s %s' "$name" "SKIPPED" "no time left in the budget")")
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  local state=ok
  (( rc == 124 )) && state=TIMEOUT
  (( rc != 0 && rc != 124 )) && state="FAILED($rc)"
  SUMMARY+=("$(printf '%-12s %-8s %4ss' "$name" "$state" "$took")")
}

{
  nvidia-smi -L 2>/dev/null || true
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} 2>&1 | tee -a "$LOG"

arch_env=()
[[ "$arch" != none ]] && arch_env=(TORCH_CUDA_ARCH_LIST="$arch")
step build 300 env "${arch_env[@]}" MAX_JOBS="$(nproc)" \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
step info 60 "$PYTHON" -m longkernels info
# Each new shape compiles its Triton kernels (seconds each; tens of seconds for float32's IEEE dot products;
# the memory-attention GPU test alone meets ~150 of them): the tests run as SHARDS processes side by side,
# with one config per launch instead of autotuning (LONGKERNELS_TRITON_AUTOTUNE=0; every config's compile is
# checked in CI by tests/test_triton_compile.py). The benchmark too, on a first GPU run: figures within the budget beat
# tuned figures cut off by it (the JSON records which).
SHARDS=${GPU_CHECK_SHARDS:-$(( $(nproc) > 14 ? 12 : ($(nproc) > 3 ? $(nproc) - 2 : 2) ))}
TUNE=${GPU_CHECK_AUTOTUNE:-0}
step gpu-tests 180 env LONGKERNELS_TRITON_AUTOTUNE=0 PYTHON="$PYTHON" bash .ci/pytest_shards.sh "$SHARDS" \
  "$OUTDIR/gpu_tests_${device}" -q -p no:cacheprovider -m gpu --maxfail=20 tests
step check 90 env LONGKERNELS_TRITON_AUTOTUNE=0 "$PYTHON" -m longkernels check --device "$DEV" --no-progress "${CHECK[@]}"
step bench 300 env LONGKERNELS_TRITON_AUTOTUNE="$TUNE" "$PYTHON" -m longkernels bench --device "$DEV" --out "$OUTDIR" \
  --no-progress "${LEVEL[@]}"
# The ring on one device (W = 1, NCCL): its own overhead against plain memory attention at the same shapes.
step ring-w1 60 "$PYTHON" -m longkernels.benchmarks.context_parallel --world 1 --device "$DEV" --reps 3 \
  --no-progress "${CP_LEVEL[@]}" --out "$OUTDIR/context_parallel_${device}-w1.json"

echo | tee -a "$LOG"
echo "gpu-check summary ($device, $(( $(date +%s) - start ))s of ${BUDGET}s):" | tee -a "$LOG"
failed=0
for line in "${SUMMARY[@]}"; do
  echo "  $line" | tee -a "$LOG"
  [[ "$line" == *" ok "* ]] || failed=1
done
exit $failed
