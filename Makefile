# The README's commands:
#   make test        sets up the test extras and runs the whole suite (C++ ctest, CUDA compile check, pytest)
#   make bench       sets up, prints `longkernels info`, runs `longkernels check`, then the representative
#                    benchmarks (under 10 minutes on a 2-core CPU); results in ./longkernels-bench/
#   make bench-full  the same with the whole sweep (an hour or more on a 2-core CPU)
#   make gpu-check   on a machine with a GPU: build for it, GPU tests, check and benchmarks on CUDA tensors
#   make dist-check  builds the sdist and builds the package from it in a fresh folder
#   make triton-check compiles every Triton kernel for a GPU with every autotuning config (no GPU needed)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
CMAKE_BUILD := build/cmake
BENCH_OUT ?= longkernels-bench

.PHONY: setup-build setup setup-test setup-bench test test-python test-cpp test-hf-4x cuda-check triton-check check bench \
	bench-full bench-cp gpu-check dist-check clean

# torch is installed only when none is: a CUDA build already present is kept as it is. The build
# runs without isolation, against that torch (isolation would fetch another one).
setup-build:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q setuptools wheel ninja pybind11 numpy

# Each builds the extension once, with the extras it needs.
setup: setup-build
	$(PIP) install -q --no-build-isolation -e .

setup-test: setup-build
	$(PIP) install -q --no-build-isolation -e ".[test]"

setup-bench: setup-build
	$(PIP) install -q --no-build-isolation -e ".[bench]"

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# CUDA sources must compile even where no GPU is (nvcc against torch's headers; nothing runs).
cuda-check:
	bash .ci/compile_cuda.sh

# Every Triton kernel compiled for a GPU (sm_90) with every autotuning config, no GPU needed (hours on 2
# cores: float32's IEEE kernels take 0.5-2.5 minutes each; the test suite runs the quick subset, about
# 2 minutes). ARCH=80 for an A100's limits.
ARCH ?= 90
triton-check:
	env -u TRITON_INTERPRET $(PYTHON) tests/triton_compile.py --arch $(ARCH)

test-python:
	$(PYTHON) -m pytest -q -p no:cacheprovider

test: setup-test test-cpp cuda-check test-python

# The transformers drop-in against a 4.5x release too (the test extras install the newest 5.x): that release
# and what it needs beyond 5.x's own dependencies (the 0.x hub, its tokenizers, requests) go to a folder of
# their own, ahead on the path for this run only.
HF_4X ?= transformers==4.57.3
HF_4X_DIR ?= build/transformers-4x
HF_4X_DEPS := "huggingface-hub<1.0" "tokenizers>=0.22,<0.23" requests urllib3 idna certifi charset-normalizer fsspec
test-hf-4x:
	$(PIP) install -q --no-deps --target $(HF_4X_DIR) $(HF_4X) $(HF_4X_DEPS)
	PYTHONPATH=$(HF_4X_DIR) $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_hf_reformer.py

check: setup-test
	$(PYTHON) -m longkernels check

bench: setup-bench
	$(PYTHON) -m longkernels info
	$(PYTHON) -m longkernels check
	$(PYTHON) -m longkernels bench --out $(BENCH_OUT)

bench-full: setup-bench
	$(PYTHON) -m longkernels info
	$(PYTHON) -m longkernels check
	$(PYTHON) -m longkernels bench --full --out $(BENCH_OUT)

# Ring attention on a gloo group of this machine's processes (2: one per core here), about 4 minutes.
bench-cp: setup-bench
	$(PYTHON) -m longkernels.benchmarks.context_parallel --world 2 --out $(BENCH_OUT)/context_parallel-w2.json

# No setup step: a GPU machine has torch, triton, nvcc and ninja, and no network; the script builds in place.
gpu-check:
	bash .ci/gpu_check.sh

dist-check:
	bash .ci/dist_check.sh

clean:
	rm -rf build $(CMAKE_BUILD) dist longkernels/_C*.so longkernels/_built_with.py *.egg-info
