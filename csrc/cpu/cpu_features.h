#pragma once
// Runtime CPU feature checks, so one build runs on any x86-64 and picks the fastest kernel there.
#include <cstdlib>
#include <cstring>

namespace longkernels::cpu {
inline bool has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
// The float32 tile kernels (tile_gemm.h): AVX-512F, or AVX2 with FMA.
inline bool has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
inline bool has_f32_tiles() { return has_avx512f() || has_avx2_fma(); }

// Which float32 tile kernels a call uses (tile_gemm.h). The environment variable
// LONGKERNELS_CPU_TILES, read per call (tests switch it), overrides the widest the CPU has:
// "blas" takes none (each kernel's portable path: the BLAS, or plain loops), "avx2" the AVX2 kernels
// even on an AVX-512 machine (so both are tested there).
enum class F32Tiles { None, Avx2, Avx512 };
inline F32Tiles f32_tiles() {
  const char* env = std::getenv("LONGKERNELS_CPU_TILES");
  if (env && std::strcmp(env, "blas") == 0) return F32Tiles::None;
  if (has_avx512f() && !(env && std::strcmp(env, "avx2") == 0)) return F32Tiles::Avx512;
  return has_avx2_fma() ? F32Tiles::Avx2 : F32Tiles::None;
}
inline const char* f32_tiles_name(F32Tiles t) {
  return t == F32Tiles::Avx512 ? "avx512" : t == F32Tiles::Avx2 ? "avx2" : "none";
}
inline bool has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  return has_avx512f() && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}
}  // namespace longkernels::cpu
