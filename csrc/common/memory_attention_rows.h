#pragma once
// Row terms of memory attention shared by the CPU and CUDA kernels (and their tests), so that both
// devices end a row the same way (docs/semantics.md §1): the softcap and a row's normalisation, LSE and
// sink, including the row that saw no key.
#include <cmath>
#include <limits>

#include "common/memory_attention_tiles.h"  // LK_HD

namespace longkernels::rows {

// One overload set for both compilation passes; the device pass calls CUDA's math functions.
#if defined(__CUDA_ARCH__)
#define LK_MATH(f, x) f(x)
#else
#define LK_MATH(f, x) std::f(x)
#endif
LK_HD float exp_of(float x) { return LK_MATH(exp, x); }
LK_HD double exp_of(double x) { return LK_MATH(exp, x); }
LK_HD float log_of(float x) { return LK_MATH(log, x); }
LK_HD double log_of(double x) { return LK_MATH(log, x); }
LK_HD float tanh_of(float x) { return LK_MATH(tanh, x); }
LK_HD double tanh_of(double x) { return LK_MATH(tanh, x); }
#undef LK_MATH

// Gemma 2's softcap on a scaled logit: cap * tanh(x / cap), with inner = scale / cap applied to the raw dot
// product (one multiply). Returns the capped logit; *t gets the tanh (the backward's 1 - t^2).
template <typename T>
LK_HD T softcap_logit(T dot, T inner, T cap, T* t) {
  *t = tanh_of(dot * inner);
  return cap * *t;
}

// A row's end from its running max m and sum l of exp(logit - m): the factor that normalises its
// accumulator (inv) and its LSE, with the head's sink logit when has_sink. A row that saw no key (m = -inf)
// gets inv = 0 (its output is 0, whatever its accumulator holds) and LSE -inf, or the sink's logit:
// FlashAttention's convention, never a NaN. A NaN in m or the sink gives a NaN LSE.
template <typename T>
struct RowEnd {
  T inv, lse;
};

template <typename T>
LK_HD RowEnd<T> finish_row(T m, T l, bool has_sink, T sink) {
  const T inf = std::numeric_limits<T>::infinity();
  if (has_sink) {
    if (m == -inf) return {T(0), sink};
    const T mm = (m != m || sink != sink) ? std::numeric_limits<T>::quiet_NaN() : (m > sink ? m : sink);
    const T a = exp_of(m - mm);
    const T den = l * a + exp_of(sink - mm);
    return {a / den, mm + log_of(den)};
  }
  if (m == -inf) return {T(0), -inf};
  return {T(1) / l, m + log_of(l)};
}

}  // namespace longkernels::rows
