// The Python module longkernels._C: importing it runs the TORCH_LIBRARY registrations of the
// other translation units. It also reports how it was built, for `longkernels info`.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace {
bool cuda_compiled() {
#ifdef LONGKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "longkernels compiled kernels (registered as torch.ops.longkernels.*)";
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA kernels were compiled in");
  m.def("build_info", []() {
    pybind11::dict d;
    d["cuda_compiled"] = cuda_compiled();
    d["openmp"] =
#ifdef _OPENMP
        true;
#else
        false;
#endif
    d["cpu_avx512_bf16"] = longkernels::cpu::has_avx512_bf16();
    d["cpu_avx2_fma"] = longkernels::cpu::has_avx2_fma();
    d["cpu_f32_tiles"] = std::string(longkernels::cpu::f32_tiles_name(longkernels::cpu::f32_tiles()));
    // setup.py passes torch.__version__ itself (local suffix included, e.g. "+cpu"); CMake builds get
    // the headers' version.
#ifdef LONGKERNELS_TORCH_VERSION
    d["torch_version_built"] = std::string(LONGKERNELS_TORCH_VERSION);
#else
    d["torch_version_built"] = std::string(TORCH_VERSION);
#endif
    return d;
  });
}
