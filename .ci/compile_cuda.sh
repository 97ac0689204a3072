#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu to an object file (discarded) with nvcc against torch's headers,
# with the flags setup.py's CUDAExtension would use, for sm_80 and sm_90. Nothing is linked or run,
# so this works on a machine without a GPU and with a CPU build of torch.
#
#   LONGKERNELS_ALLOW_NO_NVCC=1   exit 0 (with a note) when no nvcc is found; otherwise that fails
#   NVCC=/path/to/nvcc            compiler to use (default: nvcc on PATH, then $CUDA_HOME/bin/nvcc)
#   PYTHON=python3                interpreter whose torch supplies headers and ABI flag
#   NVCC_EXTRA_FLAGS="-Xptxas -v" extra flags, e.g. to print register use and spills
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  for cand in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [[ -x "$cand" ]]; then NVCC=$cand; break; fi
  done
fi
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  why="nvcc not found (${NVCC:-not on PATH, in \$CUDA_HOME/bin or /usr/local/cuda/bin})"
  if [[ "${LONGKERNELS_ALLOW_NO_NVCC:-0}" == "1" ]]; then
    echo "compile_cuda: $why; CUDA sources NOT checked (LONGKERNELS_ALLOW_NO_NVCC=1)"
    exit 0
  fi
  echo "compile_cuda: $why; install the CUDA toolkit or set LONGKERNELS_ALLOW_NO_NVCC=1 to skip this check" >&2
  exit 1
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if (( ${#sources[@]} == 0 )); then
  echo "compile_cuda: no csrc/cuda/*.cu sources" >&2
  exit 1
fi

# Include dirs (one a line), torch's own nvcc flags and its C++ ABI, read from the installed torch.
mapfile -t includes < <("$PYTHON" - <<'EOF'
import sysconfig
import torch.utils.cpp_extension as ext
for path in ext.include_paths() + [sysconfig.get_paths()["include"]]:
    print(path)
EOF
)
mapfile -t torch_nvcc_flags < <("$PYTHON" -c \
  "import torch.utils.cpp_extension as ext; print('\n'.join(ext.COMMON_NVCC_FLAGS))")
abi=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")

flags=(
  # C++20: torch 2.13's headers need it (with C++17 they warn) and setup.py compiles with it.
  -std=c++20 -O3 --use_fast_math -lineinfo
  "${torch_nvcc_flags[@]}"
  --compiler-options -fPIC
  -DLONGKERNELS_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  "-D_GLIBCXX_USE_CXX11_ABI=$abi"
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Icsrc
)
for inc in "${includes[@]}"; do flags+=("-I$inc"); done

# A CPU build of torch ships c10's CUDA headers without the one CMake generates for CUDA builds
# (it only defines export macros); tell c10 to skip it, as its own HIP build does.
have_cmake_macros=0
for inc in "${includes[@]}"; do
  [[ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ]] && have_cmake_macros=1
done
if (( have_cmake_macros == 0 )); then
  echo "compile_cuda: torch has no c10/cuda/impl/cuda_cmake_macros.h (CPU build): -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
  flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
extra=(${NVCC_EXTRA_FLAGS:-})

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "compile_cuda: $("$NVCC" --version | tail -n 1)"
for src in "${sources[@]}"; do
  obj="$tmp/$(basename "${src%.cu}").o"
  "$NVCC" "${flags[@]}" "${extra[@]}" -c "$src" -o "$obj"
  echo "compile_cuda: compiled $src (sm_80, sm_90)"
done
