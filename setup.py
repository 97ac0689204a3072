"""Builds longkernels and its extension longkernels._C.

The extension is compiled against the torch already installed, so the build must see that torch:

    pip install --no-build-isolation .        # or -e . for a development checkout

The C++ CPU kernels are always built (C++20, OpenMP); the CUDA kernels only when torch is a CUDA build
and a CUDA toolkit (nvcc) is found. Environment switches:

    LONGKERNELS_NO_CUDA=1       skip the CUDA kernels even where they could be built
    TORCH_CUDA_ARCH_LIST="9.0"  GPU architectures to compile for (default: the visible GPUs', else 8.0;9.0)
    MAX_JOBS=N                  parallel compile jobs (default: all cores)
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

NO_TORCH = """
longkernels compiles its kernels against the torch you have installed, and this build cannot see one.

  * If torch is installed, pip built in an isolated environment (its default), which hides it.
    Build against your torch instead:

        pip install --no-build-isolation .          (or:  pip install --no-build-isolation -e .)

    (the build also needs setuptools, wheel and ninja in that environment: pip install setuptools wheel ninja)

  * If torch is not installed, install it first (https://pytorch.org, e.g. `pip install torch`), then run
    the command above.
"""

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.stderr.write(NO_TORCH)
    sys.exit(1)


def _nvcc():
    if CUDA_HOME is None:
        return None
    path = os.path.join(CUDA_HOME, "bin", "nvcc")
    return path if os.path.exists(path) else None


def _with_cuda() -> bool:
    """CUDA kernels only for a CUDA torch with a toolkit, unless switched off: a CPU torch never tries."""
    if os.environ.get("LONGKERNELS_NO_CUDA") == "1" or torch.version.cuda is None:
        return False
    return _nvcc() is not None


def _cuda_arch_list() -> None:
    """torch picks the visible GPUs' architectures; with none visible (a build machine) it would fail, so
    default to Ampere and Hopper there."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"longkernels: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")


def _record_build() -> None:
    """Which torch the extension is built against, for the check at import (longkernels/_ext.py). A plain
    Python file, so it can be read when the extension itself cannot be loaded."""
    path = os.path.join(HERE, "longkernels", "_built_with.py")
    text = (f'"""Written by setup.py: what longkernels._C was built against."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {torch.version.cuda!r}\n")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extension():
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = [("LONGKERNELS_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math"]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if _with_cuda():
        _cuda_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "longkernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=macros + [("LONGKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("longkernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                        define_macros=macros, extra_compile_args=cxx, extra_link_args=["-fopenmp"])


_record_build()
setup(
    packages=["longkernels", "longkernels.ops", "longkernels.reference", "longkernels.nn",
              "longkernels.benchmarks", "longkernels.hf", "longkernels.triton_kernels"],
    package_dir={"longkernels.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
