"""Builds longkernels and its extension longkernels._C.

The C++ CPU kernels are always built (OpenMP, vectorised); the CUDA kernels only when a CUDA
toolkit and a CUDA build of torch are present (LONGKERNELS_NO_CUDA=1 skips them). torch must be
installed first and the build run without isolation: `pip install --no-build-isolation -e .`
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("LONGKERNELS_NO_CUDA") != "1")
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "longkernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("LONGKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("longkernels._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                        extra_compile_args=cxx, extra_link_args=["-fopenmp"])


setup(
    packages=["longkernels", "longkernels.ops", "longkernels.reference", "longkernels.nn",
              "longkernels.triton_kernels"],
    package_dir={"longkernels.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
