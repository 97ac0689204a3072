#!/usr/bin/env bash
# make dist-check: the package as a pip user gets it, away from this checkout.
#
#   1. the sdist holds every tracked source the build and the tests need (csrc headers included);
#   2. pip's default, isolated build stops within seconds with the command to run (no torch download);
#   3. a wheel builds from the sdist without isolation, installs into a fresh virtual environment (which sees
#      this environment's torch), and there `longkernels info`, `longkernels bench --help`, a quick benchmark
#      and a README example run from an empty directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "dist-check: $*"; }

"$PYTHON" - "$work/dist" <<'PY'
import sys
from setuptools import build_meta
print("dist-check: sdist", build_meta.build_sdist(sys.argv[1]))
PY
sdist=$(ls "$work"/dist/*.tar.gz)
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/longkernels-*/)

missing=0
while IFS= read -r f; do
  if [[ ! -e "$src/$f" ]]; then echo "dist-check: missing from the sdist: $f"; missing=1; fi
done < <(git ls-files csrc longkernels triton_kernels tests bench/*.py examples setup.py pyproject.toml CMakeLists.txt \
         Makefile LICENSE README.md CHANGELOG.md docs)
(( missing == 0 )) || exit 1
say "sdist holds every tracked source"

"$PYTHON" -m venv --system-site-packages "$work/venv"
vpy="$work/venv/bin/python"
t0=$(date +%s)
if "$vpy" -m pip install -q "$sdist" > "$work/isolated.log" 2>&1; then
  say "an isolated build was expected to stop, and it did not"; exit 1
fi
took=$(( $(date +%s) - t0 ))
grep -q "pip install --no-build-isolation" "$work/isolated.log" || { cat "$work/isolated.log"; exit 1; }
! grep -qi "Downloading torch" "$work/isolated.log" || { say "the isolated build fetched torch"; exit 1; }
say "isolated build stopped after ${took}s with the command to run"

"$vpy" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$src"
"$vpy" -m pip install -q --no-deps "$work"/wheel/*.whl
mkdir "$work/empty"
cd "$work/empty"
"$work/venv/bin/longkernels" info > "$work/info.txt"
sed -n 1,6p "$work/info.txt"
grep -q "a call gets: cpu" "$work/info.txt" || { cat "$work/info.txt"; exit 1; }
"$work/venv/bin/longkernels" bench --help > /dev/null
"$work/venv/bin/longkernels" bench --quick --ops reversible_coupling --no-plot --no-progress --out results > /dev/null
ls results/*.json > /dev/null
"$vpy" - <<'PY'
import torch, longkernels
from longkernels import _ext
assert _ext.available(), _ext.LOAD_ERROR
assert "site-packages" in longkernels.__file__, longkernels.__file__
q = torch.randn(1, 2, 64, 32)
out = longkernels.memory_attention(q, q, q)
ref = longkernels.memory_attention(q, q, q, backend="reference")
assert (out - ref).abs().max() < 1e-5
print("dist-check: the installed wheel runs:", longkernels.__file__)
PY
say "ok"
