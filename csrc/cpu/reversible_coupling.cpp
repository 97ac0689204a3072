// Coupling arithmetic of a reversible block's backward step (longkernels/reversible.py), one pass
// over the residual stream:
//
//   x      = y  - fy.to(stream)      reconstruct the block's input from its output and F(.) / G(.)
//   dy_out = dy + dgrad.to(stream)   accumulate the gradient that came back through F / G
//
// The stream (y, dy) is float32 or float64; a branch tensor (fy, dgrad) is float16, bfloat16,
// float32 or float64 (narrowing float64 -> float32 rounds to nearest, as Tensor.to does). Every
// widening conversion is exact and each result is one IEEE add or subtract in the stream dtype, so
// the output is bitwise what the torch expression gives. The row loops are compiled once per ISA
// (target_clones), the flattened stream split across threads by at::parallel_for.
//
// reversible_coupling_ writes dy_out into dy (the caller owns it): no fresh output for the
// gradient, whose page faults cost more than the arithmetic on a machine with little bandwidth.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "cpu/vec_math.h"

namespace longkernels::cpu {
namespace {

using at::Tensor;

// Branch element types, by how they widen to the stream type: raw 16-bit storage for the halves.
struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

__attribute__((always_inline)) inline float widen(Bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE half -> float, branch-free so that it vectorises (F. Giesen's method): exact for normals,
// subnormals (renormalised by a float subtraction, which is exact), zeros, infinities and NaNs.
__attribute__((always_inline)) inline float widen(F16 h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h.bits) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  const bool inf_nan = exp == shifted_exp;
  const bool sub = exp == 0;
  o += inf_nan ? ((128u - 16u) << 23) : 0u;
  o += sub ? (1u << 23) : 0u;
  float f;
  std::memcpy(&f, &o, sizeof f);
  f = sub ? f - 6.103515625e-05f : f;  // 2^-14: the hidden bit added above
  uint32_t r;
  std::memcpy(&r, &f, sizeof r);
  r |= (static_cast<uint32_t>(h.bits) & 0x8000u) << 16;
  std::memcpy(&f, &r, sizeof f);
  return f;
}

__attribute__((always_inline)) inline float widen(float v) { return v; }
__attribute__((always_inline)) inline double widen(double v) { return v; }

template <typename T, typename S>
__attribute__((always_inline)) inline T to_stream(S v) {
  return static_cast<T>(widen(v));  // double -> float: round to nearest, as Tensor.to
}

// out[i] = a[i] + b[i] (SUB false) or a[i] - b[i] (SUB true), b widened to T. out may be a (in place).
template <typename T, typename S, bool SUB>
__attribute__((always_inline)) inline void combine_impl(const T* a, const S* __restrict b, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = to_stream<T, S>(b[i]);
    out[i] = SUB ? a[i] - v : a[i] + v;
  }
}

// One clone set per (stream, branch, op); the dispatcher below picks the instantiation.
#define LK_COMBINE(T, S)                                                                                   \
  LK_CLONES void sub_##T##_##S(const T* a, const S* b, T* out, int64_t n) { combine_impl<T, S, true>(a, b, out, n); } \
  LK_CLONES void add_##T##_##S(const T* a, const S* b, T* out, int64_t n) { combine_impl<T, S, false>(a, b, out, n); }
LK_COMBINE(float, Bf16)
LK_COMBINE(float, F16)
LK_COMBINE(float, float)
LK_COMBINE(float, double)
LK_COMBINE(double, Bf16)
LK_COMBINE(double, F16)
LK_COMBINE(double, float)
LK_COMBINE(double, double)
#undef LK_COMBINE

template <typename T, typename S>
void run_combine(const T* a, const void* b, T* out, int64_t n, bool sub);

#define LK_RUN(T, S)                                                                                  \
  template <>                                                                                         \
  void run_combine<T, S>(const T* a, const void* b, T* out, int64_t n, bool sub) {                    \
    if (sub)                                                                                          \
      sub_##T##_##S(a, static_cast<const S*>(b), out, n);                                             \
    else                                                                                              \
      add_##T##_##S(a, static_cast<const S*>(b), out, n);                                             \
  }
LK_RUN(float, Bf16)
LK_RUN(float, F16)
LK_RUN(float, float)
LK_RUN(float, double)
LK_RUN(double, Bf16)
LK_RUN(double, F16)
LK_RUN(double, float)
LK_RUN(double, double)
#undef LK_RUN

using Loop = void (*)(const void* a, const void* b, void* out, int64_t n, bool sub);

template <typename T, typename S>
void loop(const void* a, const void* b, void* out, int64_t n, bool sub) {
  run_combine<T, S>(static_cast<const T*>(a), b, static_cast<T*>(out), n, sub);
}

template <typename T>
Loop loop_for_branch(at::ScalarType bt) {
  switch (bt) {
    case at::kBFloat16: return &loop<T, Bf16>;
    case at::kHalf: return &loop<T, F16>;
    case at::kFloat: return &loop<T, float>;
    case at::kDouble: return &loop<T, double>;
    default: TORCH_CHECK(false, "reversible_coupling: unsupported branch dtype ", bt);
  }
  return nullptr;
}

Loop loop_for(at::ScalarType stream, at::ScalarType branch) {
  return stream == at::kDouble ? loop_for_branch<double>(branch) : loop_for_branch<float>(branch);
}

bool is_branch_dtype(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat || t == at::kDouble;
}

void check(const Tensor& y, const Tensor& fy, const Tensor& dy, const Tensor& dgrad) {
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble,
              "reversible_coupling: y (the stream) must be float32 or float64, got ", y.scalar_type());
  TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "reversible_coupling: dy must have y's dtype (",
              y.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(is_branch_dtype(fy.scalar_type()), "reversible_coupling: fy must be a floating dtype, got ",
              fy.scalar_type());
  TORCH_CHECK(is_branch_dtype(dgrad.scalar_type()), "reversible_coupling: dgrad must be a floating dtype, got ",
              dgrad.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"fy", fy}, {"dy", dy}, {"dgrad", dgrad}}) {
    TORCH_CHECK(t.sizes() == y.sizes(), "reversible_coupling: ", name, " must have y's shape ", y.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.device() == y.device(), "reversible_coupling: ", name, " must be on y's device");
  }
}

// Elements per parallel task: enough to amortise the scheduling, small enough to split
// (8, 4096, 1024) across many threads.
constexpr int64_t kGrain = 1 << 15;

// x = y - fy; dyo = dy + dgrad (dyo may be dy), over contiguous storage of n elements.
void coupling_kernel(const Tensor& y, const Tensor& fy, const Tensor& dy, const Tensor& dgrad, Tensor& x,
                     Tensor& dyo) {
  const int64_t n = y.numel();
  if (n == 0) return;
  const Loop rec = loop_for(y.scalar_type(), fy.scalar_type());
  const Loop acc = loop_for(y.scalar_type(), dgrad.scalar_type());
  const int64_t es = y.element_size(), eb = fy.element_size(), eg = dgrad.element_size();
  const char* py = static_cast<const char*>(y.const_data_ptr());
  const char* pf = static_cast<const char*>(fy.const_data_ptr());
  const char* pd = static_cast<const char*>(dy.const_data_ptr());
  const char* pg = static_cast<const char*>(dgrad.const_data_ptr());
  char* px = static_cast<char*>(x.data_ptr());
  char* po = static_cast<char*>(dyo.data_ptr());
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t m = end - begin;
    rec(py + begin * es, pf + begin * eb, px + begin * es, m, true);
    acc(pd + begin * es, pg + begin * eg, po + begin * es, m, false);
  });
}

std::tuple<Tensor, Tensor> reversible_coupling(const Tensor& y, const Tensor& fy, const Tensor& dy,
                                               const Tensor& dgrad) {
  check(y, fy, dy, dgrad);
  const Tensor yc = y.contiguous(), fc = fy.contiguous(), dc = dy.contiguous(), gc = dgrad.contiguous();
  Tensor x = at::empty(y.sizes(), y.options());
  Tensor dyo = at::empty(y.sizes(), y.options());
  coupling_kernel(yc, fc, dc, gc, x, dyo);
  return {x, dyo};
}

Tensor reversible_coupling_(const Tensor& y, const Tensor& fy, Tensor& dy, const Tensor& dgrad) {
  check(y, fy, dy, dgrad);
  // dy is written while y, fy and dgrad are read, by several threads: no element of dy may be another
  // element of itself (an expanded view) or of an input (the result would depend on thread timing).
  TORCH_CHECK(at::has_internal_overlap(dy) != at::MemOverlap::Yes,
              "reversible_coupling_: dy must not have overlapping elements (an expanded view); pass dy.clone()");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"y", y}, {"fy", fy}, {"dgrad", dgrad}}) {
    const auto lap = at::get_overlap_status(dy, t);
    TORCH_CHECK(lap != at::MemOverlapStatus::Partial && lap != at::MemOverlapStatus::Full,
                "reversible_coupling_: dy (written in place) must not share memory with ", name);
  }
  const Tensor yc = y.contiguous(), fc = fy.contiguous(), gc = dgrad.contiguous();
  Tensor x = at::empty(y.sizes(), y.options());
  if (dy.is_contiguous()) {
    coupling_kernel(yc, fc, dy, gc, x, dy);
  } else {
    Tensor dc = dy.contiguous();
    coupling_kernel(yc, fc, dc, gc, x, dc);
    dy.copy_(dc);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(longkernels, CPU, m) {
  m.impl("reversible_coupling", &reversible_coupling);
  m.impl("reversible_coupling_", &reversible_coupling_);
}

}  // namespace longkernels::cpu
