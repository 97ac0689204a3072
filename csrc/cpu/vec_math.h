#pragma once
// Elementwise math shared by the CPU attention kernels: an exp that vectorises, and the
// target_clones attribute that compiles a row loop once per ISA (AVX-512, AVX2, baseline) so one
// build uses the widest vectors the machine has.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace longkernels::cpu {

// ---------------------------------------------------------------------------------------------
// exp: a Cephes-style polynomial that GCC vectorises (std::exp does not); ~1 ulp in float.
// Inputs are <= 0 here (logit minus running max) but for rounding; anything below -87 underflows to
// 0, anything above 88 is clamped there (a finite result: callers clamp probabilities to 1), and a NaN
// stays NaN (std::max/min return their first argument when a comparison with NaN fails).
// ---------------------------------------------------------------------------------------------
__attribute__((always_inline)) inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick: plain adds, so the loop
  // vectorises on every ISA (nearbyint/floor become library calls on baseline x86-64).
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double exp_approx(double x) { return std::exp(x); }

// tanh for the softcap (Gemma 2's cap * tanh(x / cap)), vectorisable: an odd Taylor polynomial below
// |x| = 1/4 (relative error < 3e-9) and 1 - 2 / (exp(2|x|) + 1) above it (a few ulp); +-1 from |x| = 9 on
// (tanh(9) rounds to 1 in float); a NaN stays NaN.
__attribute__((always_inline)) inline float tanh_approx(float x) {
  const float a = std::min(std::fabs(x), 9.0f);
  const float x2 = x * x;
  const float small =
      x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f + x2 * (-0.0539682540f + x2 * 0.0218694885f))));
  const float big = 1.0f - 2.0f / (exp_approx(2.0f * a) + 1.0f);
  return a < 0.25f ? small : std::copysign(big, x);
}
inline double tanh_approx(double x) { return std::tanh(x); }


// x86-64-v3 (AVX2 with FMA, GCC 12 on) before plain AVX2: GCC's "avx2" target does not enable FMA, so its clone
// of the softmax rows (the exp polynomial, the rescaling) ran every multiply-add as two instructions. The
// resolver tests AVX-512F first, then x86-64-v3's features (not the CPU's vendor or model).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define LK_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LK_CLONES
#endif

}  // namespace longkernels::cpu
