#!/usr/bin/env bash
# .ci/pytest_shards.sh N LOG_PREFIX PYTEST_ARGS...: pytest as N processes side by side, each on every N-th
# selected test (LONGKERNELS_TEST_SHARD=i/N, tests/conftest.py), so that the Triton kernels of different
# shapes compile on different cores. Logs go to LOG_PREFIX.i.log; each shard's summary and every failure
# are printed at the end (also when interrupted by a time limit). Exit 1 if any shard failed.
set -uo pipefail
n=$1 prefix=$2
shift 2
PYTHON=${PYTHON:-python3}
pids=()

report() {
  for ((i = 0; i < n; i++)); do
    echo "--- shard $i/$n: $(tail -n 1 "$prefix.$i.log" 2>/dev/null)"
  done
  cat "$prefix".*.log 2>/dev/null | grep -E "^(FAILED|ERROR) " || true
}
stop() {
  kill -INT "${pids[@]}" 2>/dev/null
  sleep 5
  kill "${pids[@]}" 2>/dev/null
  report
  exit 124
}
trap stop INT TERM

for ((i = 0; i < n; i++)); do
  LONGKERNELS_TEST_SHARD="$i/$n" "$PYTHON" -m pytest "$@" > "$prefix.$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"
  r=$?
  (( r != 0 && r != 5 )) && rc=1  # 5: this shard had no test to run
done
report
exit $rc
