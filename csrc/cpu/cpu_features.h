#pragma once
// Runtime CPU feature checks, so one build runs on any x86-64 and picks the fastest kernel there.
namespace longkernels::cpu {
inline bool has_avx512f() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
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
