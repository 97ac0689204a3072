// Memory-segment causal attention on the CPU: forward and backward (docs/semantics.md §1).
//
// Layout of the work. Inputs are converted once to the compute type (float, or double for double
// inputs; a no-op view for those two, so strided inputs stay uncopied) and every tile product goes
// through the BLAS behind at::mm (MKL/oneDNN), which reads strides and transposes. Only the
// elementwise part of online softmax is ours: the row loops below, compiled once per ISA
// (target_clones) so one build uses AVX-512 where the machine has it.
//
// Keys come in two ranges, memory [0, M) then current [M, M + N); a key tile never straddles them,
// so no cat() of memory and current is ever materialised. For a query tile, the visible keys form
// one interval [lo, hi) of absolute positions (causal bounds hi, window bounds lo); only tiles
// meeting it are visited, and the per-element mask is applied only to tiles that the causal
// diagonal or the window edge cuts.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <limits>
#include <vector>

#include "common/memory_attention_rows.h"
#include "common/memory_attention_tiles.h"
#include "common/op_checks.h"
#include "cpu/tile_gemm.h"
#include "cpu/cpu_features.h"
#include "cpu/vec_math.h"

namespace longkernels::cpu {
namespace {

using at::Tensor;

// Tile sizes: large enough that the BLAS runs near its peak on (BQ x D) @ (D x BK) and
// (BQ x BK) @ (BK x Dv) (measured on a 2-core AVX-512 machine: 256 x 512 beat 128 x 256 by 8% in
// forward and 12% in backward), small enough that a thread's S and dP tiles (512 KiB each in
// float) stay in a 1 MiB L2.
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 512;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Maximum of s[c0, c1), as a vector reduction (omp simd: the compiler may reorder the max).
template <typename T>
__attribute__((always_inline)) inline T row_max(const T* __restrict s, int64_t c0, int64_t c1) {
  T mx = static_cast<T>(kNegInf);
#pragma omp simd reduction(max : mx)
  for (int64_t c = c0; c < c1; ++c) mx = mx > s[c] ? mx : s[c];
  return mx;
}

// The terms of one row's logits over a key tile: logit = softcap(scale * q.k) - slope * (qpos - kpos), and
// -inf where the key padding mask hides the key. dist0 = qpos - kpos(column 0); cap 0: no softcap; pad: the
// padding mask at column 0 (1 = padded), or null when no key of the tile is padded.
// exp_avx2: the row's exponentials through tile::exp_sum_avx2 (float, where the call runs the AVX2 tiles).
template <typename T>
struct RowTerms {
  T scale, slope, dist0, cap;
  const uint8_t* pad;
  bool exp_avx2 = false;
};

// One query row of the forward tile: logits -> probabilities in place, online-softmax update.
// s: BK logits (raw q.k); cols [c0, c1) are visible; returns the rescale factor for the row's
// accumulator and updates the running max m and sum l.
template <typename T>
__attribute__((always_inline)) inline T fwd_row_impl(T* __restrict s, int64_t bk, int64_t c0, int64_t c1,
                                                     const RowTerms<T>& t, T& m, T& l) {
  // ALiBi: -slope * (qpos - kpos) = slope * (c - dist0) for column c, dist0 = qpos - kpos(c = 0).
  // A NaN logit must reach the row (the reference's softmax gives NaN): max reductions may drop
  // it, so the scaling pass flags it and the running max becomes NaN, which stays NaN.
  int32_t nan = 0;
  T scale = t.scale;
  const T slope = t.slope;
  if (t.cap != T(0)) {  // softcap(x) = cap * tanh(x / cap), before ALiBi
    const T inner = t.scale / t.cap, cap = t.cap;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) s[c] = cap * tanh_approx(s[c] * inner);
    scale = T(1);
  }
  if (slope != T(0)) {
    // 32-bit column index: int64 -> float vector conversion needs AVX512DQ, which the clone lacks.
    // The distance kpos - qpos is an exact integer; one rounding, in the multiply.
    T* __restrict sr = s + c0;
    const int32_t d0 = static_cast<int32_t>(static_cast<int64_t>(c0) - static_cast<int64_t>(t.dist0));
    const int32_t n = static_cast<int32_t>(c1 - c0);
#pragma omp simd reduction(| : nan)
    for (int32_t c = 0; c < n; ++c) {
      const T x = sr[c] * scale + slope * static_cast<T>(c + d0);
      sr[c] = x;
      nan |= static_cast<int32_t>(x != x);
    }
  } else {
#pragma omp simd reduction(| : nan)
    for (int64_t c = c0; c < c1; ++c) {
      const T x = s[c] * scale;
      s[c] = x;
      nan |= static_cast<int32_t>(x != x);
    }
  }
  if (t.pad) {  // padded keys are hidden, NaN or not
    nan = 0;
    for (int64_t c = c0; c < c1; ++c) {
      if (t.pad[c]) s[c] = static_cast<T>(kNegInf);
      nan |= static_cast<int32_t>(s[c] != s[c]);
    }
  }
  const T m_new = (nan || m != m) ? std::numeric_limits<T>::quiet_NaN() : std::max(m, row_max(s, c0, c1));
  if (m_new == static_cast<T>(kNegInf)) {  // nothing visible yet in this row
    for (int64_t c = 0; c < bk; ++c) s[c] = T(0);
    return T(1);
  }
  T sum = 0;
  for (int64_t c = 0; c < c0; ++c) s[c] = T(0);
  const bool by_hand = std::is_same_v<T, float> && t.exp_avx2;  // float rows only (double: the loop below)
  if constexpr (std::is_same_v<T, float>) {
    if (by_hand) sum = tile::exp_sum_avx2(s + c0, c1 - c0, m_new);
  }
  if (!by_hand) {
#pragma omp simd reduction(+ : sum)
    for (int64_t c = c0; c < c1; ++c) {
      const T p = exp_approx(s[c] - m_new);
      s[c] = p;
      sum += p;
    }
  }
  for (int64_t c = c1; c < bk; ++c) s[c] = T(0);
  const T alpha = m == static_cast<T>(kNegInf) ? T(0) : m_new != m_new ? m_new : exp_approx(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// One row of the backward tile: s (raw q.k) -> p = exp(logit - lse); dp -> ds = p * (dp - delta), the
// gradient of the scaled dot product (through the softcap's tanh: times 1 - tanh^2).
template <typename T>
__attribute__((always_inline)) inline void bwd_row_impl(T* __restrict s, T* __restrict dp, int64_t bk, int64_t c0,
                                                        int64_t c1, const RowTerms<T>& t, T lse, T delta) {
  for (int64_t c = 0; c < c0; ++c) s[c] = dp[c] = T(0);
  T* __restrict sr = s + c0;
  T* __restrict dpr = dp + c0;
  const int32_t d0 = static_cast<int32_t>(static_cast<int64_t>(c0) - static_cast<int64_t>(t.dist0));
  const int32_t n = static_cast<int32_t>(c1 - c0);  // 32-bit: see fwd_row_impl
  const T scale = t.scale, slope = t.slope;
  // Recomputed from the LSE, p can round above 1 where logits are huge (|s| ~ 1e7 in float32: the
  // LSE's last bit is worth more than 1); a probability never exceeds 1, and the comparison keeps a
  // NaN a NaN.
  if (t.cap != T(0)) {
    const T inner = scale / t.cap, cap = t.cap;
#pragma omp simd
    for (int32_t c = 0; c < n; ++c) {
      const T th = tanh_approx(sr[c] * inner);
      const T e = exp_approx(cap * th + slope * static_cast<T>(c + d0) - lse);
      const T p = e > T(1) ? T(1) : e;
      sr[c] = p;
      dpr[c] = p * (dpr[c] - delta) * (T(1) - th * th);
    }
  } else if (std::is_same_v<T, float> && t.exp_avx2) {  // float rows only (double: the loop below)
    if constexpr (std::is_same_v<T, float>) tile::softmax_grad_avx2(sr, dpr, n, scale, slope, d0, lse, delta);
  } else {
#pragma omp simd
    for (int32_t c = 0; c < n; ++c) {
      const T e = exp_approx(sr[c] * scale + slope * static_cast<T>(c + d0) - lse);
      const T p = e > T(1) ? T(1) : e;
      sr[c] = p;
      dpr[c] = p * (dpr[c] - delta);
    }
  }
  if (t.pad) {
    for (int64_t c = c0; c < c1; ++c)
      if (t.pad[c]) s[c] = dp[c] = T(0);
  }
  for (int64_t c = c1; c < bk; ++c) s[c] = dp[c] = T(0);
}

template <typename T>
__attribute__((always_inline)) inline void scale_row_impl(T* __restrict o, int64_t n, T a) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) o[d] *= a;
}


LK_CLONES float fwd_row(float* s, int64_t bk, int64_t c0, int64_t c1, const RowTerms<float>& t, float& m, float& l) {
  return fwd_row_impl<float>(s, bk, c0, c1, t, m, l);
}
double fwd_row(double* s, int64_t bk, int64_t c0, int64_t c1, const RowTerms<double>& t, double& m, double& l) {
  return fwd_row_impl<double>(s, bk, c0, c1, t, m, l);
}
LK_CLONES void bwd_row(float* s, float* dp, int64_t bk, int64_t c0, int64_t c1, const RowTerms<float>& t, float lse,
                       float delta) {
  bwd_row_impl<float>(s, dp, bk, c0, c1, t, lse, delta);
}
void bwd_row(double* s, double* dp, int64_t bk, int64_t c0, int64_t c1, const RowTerms<double>& t, double lse,
             double delta) {
  bwd_row_impl<double>(s, dp, bk, c0, c1, t, lse, delta);
}
LK_CLONES void scale_row(float* o, int64_t n, float a) { scale_row_impl<float>(o, n, a); }
void scale_row(double* o, int64_t n, double a) { scale_row_impl<double>(o, n, a); }

// ---------------------------------------------------------------------------------------------
// Shared problem description.
// ---------------------------------------------------------------------------------------------
// What each (b, query) sees beyond causality and the window: its document's keys [doc_lo, doc_hi) (document
// ids are non-decreasing, so both bounds are non-decreasing in the query and visible sets stay intervals) and
// the unpadded keys. Every question the loops ask of the geometry goes through here, per batch row.
struct Masks {
  tiles::Geometry geo;
  int64_t N = 0, L = 0;               // queries; keys (M + N)
  const int64_t* doc_lo = nullptr;    // (B, N), or null without documents
  const int64_t* doc_hi = nullptr;    // (B, N)
  const uint8_t* pad = nullptr;       // (B, L), 1 = padded; null without a padding mask
  const int64_t* pad_before = nullptr;  // (B, L + 1): padded keys before each position

  // Keys visible to at least one of the queries [i0, i0 + bq) (a superset where documents leave gaps).
  tiles::Range visible_keys(int64_t b, int64_t i0, int64_t bq) const {
    tiles::Range r = tiles::visible_keys(geo, i0, bq);
    if (doc_lo) {
      r.lo = std::max(r.lo, doc_lo[b * N + i0]);
      r.hi = std::min(r.hi, doc_hi[b * N + i0 + bq - 1]);
      if (r.hi < r.lo) r.hi = r.lo;
    }
    return r;
  }
  // Queries that see at least one key of [a0, a0 + bk).
  tiles::Range visible_queries(int64_t b, int64_t a0, int64_t bk) const {
    tiles::Range r = tiles::visible_queries(geo, a0, bk);
    if (doc_lo) {
      const int64_t* lo = doc_lo + b * N;
      const int64_t* hi = doc_hi + b * N;
      r.lo = std::max<int64_t>(r.lo, std::upper_bound(hi, hi + N, a0) - hi);      // documents ending after a0
      r.hi = std::min<int64_t>(r.hi, std::lower_bound(lo, lo + N, a0 + bk) - lo);  // starting before a0 + bk
      if (r.hi < r.lo) r.hi = r.lo;
    }
    return r;
  }
  int64_t padded(int64_t b, int64_t a0, int64_t bk) const {
    return pad ? pad_before[b * (L + 1) + a0 + bk] - pad_before[b * (L + 1) + a0] : 0;
  }
  // Every key of [a0, a0 + bk) padded: the tile is skipped.
  bool all_padded(int64_t b, int64_t a0, int64_t bk) const { return pad && padded(b, a0, bk) == bk; }
  // The padding mask at a0 when some key of [a0, a0 + bk) is padded (the row loops test it), else null.
  const uint8_t* pad_at(int64_t b, int64_t a0, int64_t bk) const {
    return padded(b, a0, bk) ? pad + b * L + a0 : nullptr;
  }
  // Every query of [i0, i0 + bq) sees every key of [a0, a0 + bk): no test per element.
  bool fully_visible(int64_t b, int64_t i0, int64_t bq, int64_t a0, int64_t bk) const {
    if (!tiles::tile_fully_visible(geo, i0, bq, a0, bk)) return false;
    if (doc_lo && (doc_lo[b * N + i0 + bq - 1] > a0 || doc_hi[b * N + i0] < a0 + bk)) return false;
    return padded(b, a0, bk) == 0;
  }
  // Columns [c0, c1) of the key tile at a0 (width bk) that query i sees (before padding).
  void row_columns(int64_t b, int64_t i, int64_t a0, int64_t bk, int64_t* c0, int64_t* c1) const {
    tiles::row_columns(geo, i, a0, bk, c0, c1);
    if (doc_lo) {
      *c0 = std::max(*c0, tiles::clamp64(doc_lo[b * N + i] - a0, 0, bk));
      *c1 = std::min(*c1, tiles::clamp64(doc_hi[b * N + i] - a0, 0, bk));
      if (*c1 < *c0) *c1 = *c0;
    }
  }
};

struct Problem {
  int64_t B, H, Hkv, N, M, D, Dv;
  int64_t Q0;  // position of query 0: M, or a ring step's block offset (q_offset)
  bool causal;
  int64_t window;  // 0: none
  double scale;
  double softcap = 0.0;  // 0: none
  Masks mk{};
  int64_t group() const { return H / Hkv; }
  tiles::Geometry geometry() const { return {N, M, Q0, causal, window}; }
};

// The masks' buffers (kept alive for the call) and the Masks view over them.
struct MaskBuffers {
  Tensor doc_lo, doc_hi, pad, pad_before;
};

Problem describe(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k, int64_t q0, bool causal,
                 int64_t window, double scale, const std::optional<Tensor>& key_padding_mask,
                 const std::optional<Tensor>& document_ids, double softcap, MaskBuffers& buf) {
  Problem P{q.size(0), q.size(1), k.size(1), q.size(2), mem_k.size(2), q.size(3), v.size(3), q0, causal, window,
            scale};
  P.softcap = softcap;
  P.mk.geo = P.geometry();
  P.mk.N = P.N;
  P.mk.L = P.M + P.N;
  const int64_t L = P.M + P.N;
  if (document_ids.has_value()) {
    // Each query's document as a key interval: one pass per batch row, after checking that ids never
    // decrease (the interval form, and so every bound the loops use, depends on it).
    const Tensor ids = document_ids->to(at::kLong).contiguous();
    buf.doc_lo = at::empty({P.B, P.N}, ids.options());
    buf.doc_hi = at::empty({P.B, P.N}, ids.options());
    const int64_t* id = ids.data_ptr<int64_t>();
    int64_t* lo = buf.doc_lo.data_ptr<int64_t>();
    int64_t* hi = buf.doc_hi.data_ptr<int64_t>();
    std::vector<int64_t> start(L), stop(L);
    for (int64_t b = 0; b < P.B; ++b) {
      const int64_t* d = id + b * L;
      for (int64_t j = 0; j < L; ++j) {
        TORCH_CHECK(j == 0 || d[j] >= d[j - 1], "memory_attention: document_ids must be non-decreasing along the "
                    "sequence (batch row ", b, ", position ", j, ")");
        start[j] = (j > 0 && d[j] == d[j - 1]) ? start[j - 1] : j;
      }
      for (int64_t j = L - 1; j >= 0; --j) stop[j] = (j + 1 < L && d[j + 1] == d[j]) ? stop[j + 1] : j + 1;
      for (int64_t i = 0; i < P.N; ++i) {
        lo[b * P.N + i] = start[P.M + i];
        hi[b * P.N + i] = stop[P.M + i];
      }
    }
    P.mk.doc_lo = lo;
    P.mk.doc_hi = hi;
  }
  if (key_padding_mask.has_value()) {
    buf.pad = key_padding_mask->to(at::kByte).contiguous();
    buf.pad_before = at::zeros({P.B, L + 1}, buf.pad.options().dtype(at::kLong));
    const uint8_t* m = buf.pad.data_ptr<uint8_t>();
    int64_t* before = buf.pad_before.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t b = 0; b < P.B; ++b) {
      for (int64_t j = 0; j < L; ++j) before[b * (L + 1) + j + 1] = before[b * (L + 1) + j] + (m[b * L + j] != 0);
      total += before[b * (L + 1) + L];
    }
    if (total > 0) {  // an all-False mask costs nothing
      P.mk.pad = m;
      P.mk.pad_before = before;
    }
  }
  return P;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The key segment holding absolute key range [a, a + n): memory or current.
struct Segment {
  const Tensor* k;
  const Tensor* v;
  int64_t offset;  // absolute position of the segment's first key
  int64_t length;
};

// ---------------------------------------------------------------------------------------------
// Forward tile products. A policy gives the forward loop two products per tile, S = Q K^T into an
// fp32/fp64 score tile and O += P V, plus where key tiles may start. One loop, two policies:
//   BlasProducts<T>: float/double through at::mm (MKL), reading strided inputs in place.
//   PackedProducts<E>: float32 (AVX-512F, or AVX2 + FMA) and bfloat16 (AVX-512 BF16) on CPUs that
//                    have them:
//                    operands pre-packed once per call, our micro-kernels (tile_gemm.h), fp32
//                    accumulation, P rounded to bf16 for P V (as FlashAttention does on GPUs).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct BlasProducts {
  struct Shared {
    const Tensor &q, &k, &v, &mk, &mv;
  };
  const Shared& in;
  Tensor S, O, Qt;
  int64_t bq = 0;
  static constexpr int64_t s_ld = kBlockK;
  int64_t o_ld;

  BlasProducts(const Shared& shared, const Problem& P)
      : in(shared), S(at::empty({kBlockQ, kBlockK}, shared.q.options())),
        O(at::empty({kBlockQ, P.Dv}, shared.q.options())), o_ld(P.Dv) {}
  static int64_t tile_start(int64_t rel) { return rel; }
  static bool exp_avx2(const Shared&) { return false; }  // the portable path throughout
  T* s_ptr() { return S.data_ptr<T>(); }
  T* o_ptr() { return O.data_ptr<T>(); }
  void begin_queries(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    bq = rows;
    Qt = in.q[b][h].narrow(0, i0, rows);
    O.zero_();
  }
  // Rows [r0, r1) of the query tile against keys [rel0, rel0 + bk) of the segment.
  void scores(bool mem, int64_t b, int64_t hk, int64_t rel0, int64_t bk, int64_t r0, int64_t r1) {
    Tensor St = S.narrow(0, r0, r1 - r0).narrow(1, 0, bk);
    at::mm_out(St, Qt.narrow(0, r0, r1 - r0), (mem ? in.mk : in.k)[b][hk].narrow(0, rel0, bk).t());
  }
  void accumulate(bool mem, int64_t b, int64_t hk, int64_t rel0, int64_t bk, int64_t r0, int64_t r1) {
    O.narrow(0, r0, r1 - r0)
        .addmm_(S.narrow(0, r0, r1 - r0).narrow(1, 0, bk), (mem ? in.mv : in.v)[b][hk].narrow(0, rel0, bk));
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename E>
struct RowView {  // a (B, Hkv, L, d) tensor as rows of d elements of E
  const E* base;
  int64_t sb, sh, sl, sd;
  explicit RowView(const Tensor& t)
      : base(reinterpret_cast<const E*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)),
        sd(t.stride(3)) {}
  const E* row(int64_t b, int64_t h, int64_t j) const { return base + b * sb + h * sh + j * sl; }
  // Whether every row starts 4-byte aligned with unit element stride (rows readable as 32-bit words).
  bool words(int64_t d) const {
    return sd == 1 && reinterpret_cast<uintptr_t>(base) % 4 == 0 &&
           (sizeof(E) == 4 || (sb % 2 == 0 && sh % 2 == 0 && sl % 2 == 0 && d % 2 == 0));
  }
};

// Packed products: keys and values packed once per call into the panels of tile_gemm.h (E = float,
// or uint16_t holding bfloat16 bits, with K grouped in pairs), zero-padded so a tile may read up to
// 15 columns past its end. Q tiles are copied contiguous (any input strides).
template <typename E>
struct PackedProducts {
  using Src = std::conditional_t<std::is_same_v<E, float>, float, at::BFloat16>;
  static constexpr int64_t kp = std::is_same_v<E, float> ? 1 : 2;

  struct Shared {
    const Tensor& q;
    F32Tiles isa;  // float32 kernels (Avx512 or Avx2); unused for bfloat16
    Tensor kp_[2], vp_[2];  // [mem, cur]: (B, Hkv, Dp/kp, Lp, kp) and (B, Hkv, Lp/kp, Dvp, kp)
    int64_t Dp, Dvp, Lp[2];
    Shared(const Problem& P, F32Tiles isa_, const Tensor& q_, const Tensor& k, const Tensor& v, const Tensor& mk,
           const Tensor& mv)
        : q(q_), isa(isa_), Dp(round_up(P.D, kp)), Dvp(round_up(P.Dv, 16)) {
      const Tensor* ks[2] = {&mk, &k};
      const Tensor* vs[2] = {&mv, &v};
      const auto opts = q.options().dtype(std::is_same_v<E, float> ? at::kFloat : at::kShort);
      for (int s = 0; s < 2; ++s) {
        const int64_t L = ks[s]->size(2);
        Lp[s] = round_up(L, 16) + 16;
        kp_[s] = at::empty({P.B, P.Hkv, Dp / kp, Lp[s], kp}, opts);
        vp_[s] = at::empty({P.B, P.Hkv, Lp[s] / kp, Dvp, kp}, opts);
        pack(P, isa, *ks[s], *vs[s], kp_[s], vp_[s], L);
      }
    }
    static const E* raw(const Tensor& t) { return reinterpret_cast<const E*>(t.data_ptr<Src>()); }
    static E* raw_packed(Tensor& t) { return reinterpret_cast<E*>(t.data_ptr()); }
    // Keys transposed into (Dp / kp) x Lp words per (b, kv head) (register transposes: a scalar loop here
    // was a fifth of a short forward), values as rows padded to Dvp (float32) or interleaved into pairs
    // along the rows (bf16); every padding element zero, so tiles may read past the last key.
    static void pack(const Problem& P, F32Tiles isa, const Tensor& k, const Tensor& v, Tensor& kpk, Tensor& vpk,
                     int64_t L) {
      const RowView<Src> kv(k), vv(v);
      E* kpd = raw_packed(kpk);
      E* vpd = raw_packed(vpk);
      const int64_t Dp = kpk.size(2) * kp, Lp = kpk.size(3), Dvp = vpk.size(3);
      const F32Tiles t_isa = std::is_same_v<E, float> ? isa : F32Tiles::Avx512;  // bf16: AVX-512 BF16 CPUs
      const bool k_direct = std::is_same_v<E, float> ? kv.sd == 1 : kv.words(P.D);
      at::parallel_for(0, P.B * P.Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<const E*> rows(std::max<int64_t>(L, 1));
        std::vector<E> stage;
        for (int64_t bh = begin; bh < end; ++bh) {
          const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
          if (k_direct) {
            for (int64_t j = 0; j < L; ++j) rows[j] = reinterpret_cast<const E*>(kv.row(b, h, j));
          } else {  // strided keys, or bf16 with an odd head dim: contiguous, zero-padded rows first
            stage.assign(L * Dp, E(0));
            for (int64_t j = 0; j < L; ++j) {
              const E* src = reinterpret_cast<const E*>(kv.row(b, h, j));
              for (int64_t d = 0; d < P.D; ++d) stage[j * Dp + d] = src[d * kv.sd];
              rows[j] = stage.data() + j * Dp;
            }
          }
          tile::transpose32(t_isa, reinterpret_cast<const uint32_t* const*>(rows.data()), L, Dp / kp,
                            reinterpret_cast<uint32_t*>(kpd + bh * Dp * Lp), Lp, Lp);
          E* vpb = vpd + bh * Lp * Dvp;
          if constexpr (std::is_same_v<E, float>) {
            for (int64_t j = 0; j < L; ++j) {
              const float* src = reinterpret_cast<const float*>(vv.row(b, h, j));
              float* dst = vpb + j * Dvp;
              if (vv.sd == 1) {
                std::copy(src, src + P.Dv, dst);
              } else {
                for (int64_t d = 0; d < P.Dv; ++d) dst[d] = src[d * vv.sd];
              }
              std::fill(dst + P.Dv, dst + Dvp, 0.0f);
            }
            std::fill(vpb + L * Dvp, vpb + Lp * Dvp, 0.0f);
          } else {
            std::vector<const uint16_t*> vrows(std::max<int64_t>(L, 1));
            std::vector<uint16_t> vstage;
            if (vv.sd != 1) vstage.assign(L * P.Dv, 0);
            for (int64_t j = 0; j < L; ++j) {
              const uint16_t* src = reinterpret_cast<const uint16_t*>(vv.row(b, h, j));
              if (vv.sd != 1) {
                for (int64_t d = 0; d < P.Dv; ++d) vstage[j * P.Dv + d] = src[d * vv.sd];
                src = vstage.data() + j * P.Dv;
              }
              vrows[j] = src;
            }
            tile::interleave_rows_bf16(vrows.data(), L, P.Dv, vpb, 2 * Dvp, Dvp);
            const int64_t pairs = (L + 1) / 2;
            std::fill(vpb + pairs * 2 * Dvp, vpb + (Lp / 2) * 2 * Dvp, uint16_t(0));
          }
        }
      });
    }
  };
  const Shared& in;
  const Problem& P;
  std::vector<E> Qb, Pb;
  std::vector<float> S, O;
  int64_t bq = 0;
  static constexpr int64_t s_ld = kBlockK;
  int64_t o_ld;

  PackedProducts(const Shared& shared, const Problem& problem)
      : in(shared), P(problem), Qb(kBlockQ * shared.Dp), Pb(std::is_same_v<E, float> ? 0 : kBlockQ * kBlockK),
        S(kBlockQ * kBlockK), O(kBlockQ * shared.Dvp), o_ld(shared.Dvp) {}
  // Tiles start on multiples of 16 within their segment: value pairs and 64-byte panels align.
  static int64_t tile_start(int64_t rel) { return rel & ~int64_t(15); }
  float* s_ptr() { return S.data(); }
  float* o_ptr() { return O.data(); }
  void begin_queries(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    bq = rows;
    const Tensor& q = in.q;
    const E* qd = Shared::raw(q) + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
    const int64_t sn = q.stride(2), sd = q.stride(3);
    for (int64_t r = 0; r < rows; ++r) {
      E* dst = Qb.data() + r * in.Dp;
      if (sd == 1) {
        std::copy(qd + r * sn, qd + r * sn + P.D, dst);
      } else {
        for (int64_t d = 0; d < P.D; ++d) dst[d] = qd[r * sn + d * sd];
      }
      std::fill(dst + P.D, dst + in.Dp, E(0));
    }
    std::fill(O.begin(), O.begin() + rows * in.Dvp, 0.0f);
  }
  // Rows [r0, r1) of the query tile against keys [rel0, rel0 + bk) of the segment (rel0 a multiple of 16).
  void scores(bool mem, int64_t b, int64_t hk, int64_t rel0, int64_t bk, int64_t r0, int64_t r1) {
    const int s = mem ? 0 : 1;
    const E* kpk = Shared::raw_packed(const_cast<Tensor&>(in.kp_[s])) + (b * P.Hkv + hk) * in.Dp * in.Lp[s] +
                   kp * rel0;
    gemm(in.isa, r1 - r0, round_up(bk, 16), in.Dp / kp, Qb.data() + r0 * in.Dp, in.Dp, kpk, kp * in.Lp[s],
         S.data() + r0 * kBlockK, kBlockK, false);
  }
  void accumulate(bool mem, int64_t b, int64_t hk, int64_t rel0, int64_t bk, int64_t r0, int64_t r1) {
    const int s = mem ? 0 : 1;
    const int64_t bkp = round_up(bk, 16);
    const E* A;
    if constexpr (std::is_same_v<E, float>) {
      for (int64_t r = r0; r < r1; ++r) std::fill(S.data() + r * kBlockK + bk, S.data() + r * kBlockK + bkp, 0.0f);
      A = S.data();
    } else {  // P rounded to bf16 for P V, as FlashAttention does
      for (int64_t r = r0; r < r1; ++r) {
        tile::to_bf16(S.data() + r * kBlockK, Pb.data() + r * kBlockK, bk);
        std::fill(Pb.data() + r * kBlockK + bk, Pb.data() + r * kBlockK + bkp, E(0));
      }
      A = Pb.data();
    }
    const E* vpk = Shared::raw_packed(const_cast<Tensor&>(in.vp_[s])) + (b * P.Hkv + hk) * in.Lp[s] * in.Dvp +
                   rel0 * in.Dvp;
    gemm(in.isa, r1 - r0, in.Dvp, bkp / kp, A + r0 * kBlockK, kBlockK, vpk, kp * in.Dvp, O.data() + r0 * in.Dvp,
         in.Dvp, true);
  }
  static bool exp_avx2(const Shared& sh) { return std::is_same_v<E, float> && sh.isa == F32Tiles::Avx2; }
  static void gemm(F32Tiles isa, int64_t M, int64_t N, int64_t K, const E* A, int64_t lda, const E* Bp, int64_t ldb,
                   float* C, int64_t ldc, bool acc) {
    if constexpr (std::is_same_v<E, float>) {
      tile::gemm_f32(isa, M, N, K, A, lda, Bp, ldb, C, ldc, acc);
    } else {
      tile::gemm_bf16(M, N, K, A, lda, Bp, ldb, C, ldc, acc);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward. Work item: (b, h, query tile). The visible keys of the tile are one interval; it is
// cut by the memory/current boundary into at most two runs of key tiles. A key tile that the causal
// diagonal or the window edge cuts is done in sub-blocks of kSubRows query rows, each over only the
// columns its rows see, so a tile on the diagonal costs about half a tile, not a whole one.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kSubRows = 48;  // a multiple of the micro-kernels' 6 rows

// ---------------------------------------------------------------------------------------------
// Transformer-XL relative positions (docs/semantics.md §9): the logit of query i and key j gains
// <qv_i, R[h, d]> for the distance d = qpos_i - kpos_j (qv = q + pos_bias, formed by the caller; the
// content term's q + content_bias is the q the kernels get). Per tile, rows [r0, r1) against keys
// [a0, a0 + bk) meet the distances of one band, [qpos(r0) - (a0 + bk - 1), qpos(r1 - 1) - a0]: one product
// QV_rows R_band^T, in blocks of kSubRows rows (band width kSubRows + bk - 1), read along each row's
// diagonal into the score tile. No N x (M + N) position matrix, no shift in memory. BLAS tiles only.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RelLocal;

template <typename T>
struct RelPositions {
  using Local = RelLocal<T>;  // the forward's per-thread part
  const Tensor* qv;   // (B, H, N, D), compute type
  const Tensor* pos;  // (H, P, D), compute type
  int64_t P;

  // The band of distances the rows [rs, re) of the tile at i0 meet in keys [a0, a0 + bk), clamped to [0, P).
  void band(int64_t q0, int64_t i0, int64_t rs, int64_t re, int64_t a0, int64_t bk, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(0, q0 + i0 + rs - (a0 + bk - 1));
    *hi = std::min<int64_t>(P - 1, q0 + i0 + re - 1 - a0);
  }

  // s (rows of ld T) += the position logits of rows [r0, r1) of the query tile at i0 against keys a0 ...
  void add(T* s, int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t i0, int64_t r0, int64_t r1, int64_t a0,
           int64_t bk, Tensor& scratch) const {
    for (int64_t rs = r0; rs < r1; rs += kSubRows) {
      const int64_t re = std::min(r1, rs + kSubRows);
      int64_t lo, hi;
      band(q0, i0, rs, re, a0, bk, &lo, &hi);
      if (hi < lo) continue;
      Tensor bd = scratch.narrow(0, 0, re - rs).narrow(1, 0, hi - lo + 1);
      at::mm_out(bd, (*qv)[b][h].narrow(0, i0 + rs, re - rs), (*pos)[h].narrow(0, lo, hi - lo + 1).t());
      const T* bdp = bd.data_ptr<T>();
      const int64_t bld = scratch.size(1);
      for (int64_t r = rs; r < re; ++r) {
        // Column c meets distance t = qpos - a0 - c; visible columns have t in [lo, hi] (the caller checked
        // that P covers every visible distance), the others are masked after this.
        const int64_t t0 = q0 + i0 + r - a0;
        const int64_t c_lo = std::max<int64_t>(0, t0 - hi), c_hi = std::min<int64_t>(bk - 1, t0 - lo);
        T* row = s + r * ld;
        const T* brow = bdp + (r - rs) * bld + (t0 - lo);  // brow[-c] is distance t0 - c
        for (int64_t c = c_lo; c <= c_hi; ++c) row[c] += brow[-c];
      }
    }
  }

  // Backward: with ds the score gradients of rows [0, rows) (query tile at i0) against keys [a0, a0 + bk)
  // (row stride ld), dqv rows += dBD R_band and dpos_band += dBD^T QV, dBD the band layout of ds.
  void grad(const T* ds, int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t i0, int64_t rows, int64_t a0,
            int64_t bk, Tensor& dqv, Tensor& dpos, Tensor& scratch) const {
    for (int64_t rs = 0; rs < rows; rs += kSubRows) {
      const int64_t re = std::min(rows, rs + kSubRows);
      int64_t lo, hi;
      band(q0, i0, rs, re, a0, bk, &lo, &hi);
      if (hi < lo) continue;
      Tensor dbd = scratch.narrow(0, 0, re - rs).narrow(1, 0, hi - lo + 1);
      dbd.zero_();
      T* dp = dbd.data_ptr<T>();
      const int64_t bld = scratch.size(1);
      for (int64_t r = rs; r < re; ++r) {
        const int64_t t0 = q0 + i0 + r - a0;
        const int64_t c_lo = std::max<int64_t>(0, t0 - hi), c_hi = std::min<int64_t>(bk - 1, t0 - lo);
        const T* row = ds + r * ld;
        T* brow = dp + (r - rs) * bld + (t0 - lo);
        for (int64_t c = c_lo; c <= c_hi; ++c) brow[-c] += row[c];
      }
      const Tensor band_r = (*pos)[h].narrow(0, lo, hi - lo + 1);
      dqv.narrow(0, i0 + rs, re - rs).addmm_(dbd, band_r);
      dpos.narrow(0, lo, hi - lo + 1).addmm_(dbd.t(), (*qv)[b][h].narrow(0, i0 + rs, re - rs));
    }
  }
};

// The forward's per-thread view of RelPositions (its scratch band).
template <typename T>
struct RelLocal {
  const RelPositions<T>* rel;
  Tensor scratch;
  RelLocal(const RelPositions<T>* r, const at::TensorOptions& opts)
      : rel(r), scratch(r ? at::empty({kSubRows, kSubRows + kBlockK}, opts) : Tensor()) {}
  void begin_queries(int64_t, int64_t, int64_t, int64_t) {}
  void add(T* s, int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t i0, int64_t r0, int64_t r1, int64_t a0,
           int64_t bk) {
    rel->add(s, ld, b, h, q0, i0, r0, r1, a0, bk, scratch);
  }
};

// The position term on the micro-kernels (the forward of PackedProducts' tiles): R is packed once per call as
// PackedProducts packs keys, per head and reversed along the distances (row x of the panel holds distance
// P - 1 - x), so that along a query row the band's entries for consecutive keys are consecutive: the band
// product of a sub-block of kSubRows rows is one gemm over the panel rows of its distances, and each row adds a
// contiguous stretch of it to its scores (a vector add, not a reversed gather). qv rows are copied per query
// tile, as the queries are.
template <typename E>
struct PackedRel {
  using Src = typename PackedProducts<E>::Src;
  static constexpr int64_t kp = PackedProducts<E>::kp;
  static constexpr int64_t kBandLd = kSubRows + kBlockK + 16;  // the widest band, rounded up to 16 columns
  const Tensor& qv;  // (B, H, N, D) as given (float32, or bfloat16 for E = uint16_t)
  F32Tiles isa;
  int64_t P, Pp, Dp, D16;
  Tensor rp;     // (H, Dp / kp, Pp, kp): R reversed and transposed, zero past P (the band product's B panel)
  Tensor rrows;  // backward only: R reversed as the B rows of dQV += dBand R_band, zero-padded to D16 columns and
                 // Pp rows: (H, Pp, D16) float32, or (H, Pp / 2, D16, 2) bf16 pairs along the rows
  PackedRel(const Tensor& qv_, const Tensor& pos, int64_t P_, F32Tiles isa_, bool backward = false)
      : qv(qv_), isa(isa_), P(P_), Pp(round_up(P_, 16) + 16), Dp(round_up(pos.size(2), kp)),
        D16(round_up(pos.size(2), 16)) {
    const int64_t H = pos.size(0), D = pos.size(2);
    // Rows reversed along P and padded to Dp in one staging copy (P x D per head: small beside the keys).
    Tensor staged = at::zeros({H, P, Dp}, pos.options());
    staged.narrow(2, 0, D).copy_(pos.flip({1}));
    rp = at::empty({H, Dp / kp, Pp, kp}, pos.options().dtype(std::is_same_v<E, float> ? at::kFloat : at::kShort));
    const F32Tiles t_isa = std::is_same_v<E, float> ? isa : F32Tiles::Avx512;  // bf16: AVX-512 BF16 CPUs
    const E* sd = reinterpret_cast<const E*>(staged.data_ptr<Src>());
    E* rd = reinterpret_cast<E*>(rp.data_ptr());
    at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
      std::vector<const E*> rows(std::max<int64_t>(P, 1));
      for (int64_t h = begin; h < end; ++h) {
        for (int64_t x = 0; x < P; ++x) rows[x] = sd + (h * P + x) * Dp;
        tile::transpose32(t_isa, reinterpret_cast<const uint32_t* const*>(rows.data()), P, Dp / kp,
                          reinterpret_cast<uint32_t*>(rd + h * Dp * Pp), Pp, Pp);
      }
    });
    if (!backward) return;
    if constexpr (std::is_same_v<E, float>) {
      rrows = at::zeros({H, Pp, D16}, pos.options());
      rrows.narrow(1, 0, P).narrow(2, 0, D).copy_(pos.flip({1}));
    } else {
      rrows = at::zeros({H, Pp / 2, D16, 2}, pos.options().dtype(at::kShort));
      uint16_t* dst = reinterpret_cast<uint16_t*>(rrows.data_ptr());
      at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
        std::vector<const uint16_t*> rows(std::max<int64_t>(P, 1));
        for (int64_t h = begin; h < end; ++h) {
          for (int64_t x = 0; x < P; ++x) rows[x] = sd + (h * P + x) * Dp;
          tile::interleave_rows_bf16(rows.data(), P, D, dst + h * (Pp / 2) * D16 * 2, 2 * D16, D16);
        }
      });
    }
  }

  // The distances [lo, hi] that rows [rs, re) (row r at absolute position qpos0 + r) meet in keys [a0, a0 + bk),
  // clamped to [0, P); false when none.
  bool band(int64_t qpos0, int64_t rs, int64_t re, int64_t a0, int64_t bk, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(0, qpos0 + rs - (a0 + bk - 1));
    *hi = std::min<int64_t>(P - 1, qpos0 + re - 1 - a0);
    return *hi >= *lo;
  }

  // s (rows [0, rows) of lds floats; row r the query at absolute position qpos0 + r, its qv row at
  // qv_rows + r * ldq) += the position logits against keys [a0, a0 + bk), in sub-blocks of `sub` rows; band:
  // scratch of sub rows x ldb floats, ldb >= round_up(sub + bk - 1, 16).
  void band_add(const E* qv_rows, int64_t ldq, float* s, int64_t lds, int64_t h, int64_t qpos0, int64_t rows,
                int64_t a0, int64_t bk, int64_t sub, float* band_buf, int64_t ldb) const {
    const E* rph = reinterpret_cast<const E*>(rp.data_ptr()) + h * Dp * Pp;
    for (int64_t rs = 0; rs < rows; rs += sub) {
      const int64_t re = std::min(rows, rs + sub);
      int64_t lo, hi;
      if (!band(qpos0, rs, re, a0, bk, &lo, &hi)) continue;
      // Band column y is distance hi - y (panel row P - 1 - hi + y); columns past hi - lo read the panel's zero
      // padding or farther distances, never used.
      PackedProducts<E>::gemm(isa, re - rs, round_up(hi - lo + 1, 16), Dp / kp, qv_rows + rs * ldq, ldq,
                              rph + kp * (P - 1 - hi), kp * Pp, band_buf, ldb, false);
      for (int64_t r = rs; r < re; ++r) {
        // Column c meets distance t0 - c, band column hi - t0 + c; visible columns have it in [lo, hi] (the op
        // checked that P covers every visible distance), the others are masked after this.
        const int64_t t0 = qpos0 + r - a0;
        const int64_t c_lo = std::max<int64_t>(0, t0 - hi), c_hi = std::min<int64_t>(bk - 1, t0 - lo);
        float* row = s + r * lds;
        const float* brow = band_buf + (r - rs) * ldb + (hi - t0);
        for (int64_t c = c_lo; c <= c_hi; ++c) row[c] += brow[c];
      }
    }
  }

  // Backward of band_add: with ds the score gradients of those rows (lds floats per row), dqv (rows of D16
  // floats) += dBand R_band and dr (R's gradient by reversed distance, Pp x D16 floats) += dBand^T QV, dBand the
  // band layout of ds. qvb: the rows' qv as a B operand (float32: rows padded to 16 columns, ld qvb_ld; bf16: pairs
  // of rows interleaved from row 0, which is even, ld 2 * D16). Scratch: dband (sub x ldb floats), and for bf16 dbb
  // (sub x ldb) and dbil ((sub / 2 + 1) x 2 ldb); ldb >= round_up(sub + bk, 16); sub even.
  void band_grad(const float* ds, int64_t lds, int64_t h, int64_t qpos0, int64_t rows, int64_t a0, int64_t bk,
                 int64_t sub, const E* qvb, int64_t qvb_ld, float* dqv, float* dr, float* dband, uint16_t* dbb,
                 uint16_t* dbil, int64_t ldb) const {
    for (int64_t rs = 0; rs < rows; rs += sub) {
      const int64_t re = std::min(rows, rs + sub), nr = re - rs;
      int64_t lo, hi;
      if (!band(qpos0, rs, re, a0, bk, &lo, &hi)) continue;
      // bf16 reads R's rows in pairs: the band starts on an even panel row, one leading column earlier if need be.
      const int64_t x0 = P - 1 - hi, x0e = kp == 2 ? (x0 & ~int64_t(1)) : x0, lead = x0 - x0e;
      const int64_t wb = round_up(hi - lo + 1 + lead, 16);
      for (int64_t r = 0; r < nr; ++r) {
        float* row = dband + r * ldb;
        std::fill(row, row + wb, 0.0f);
        const int64_t t0 = qpos0 + rs + r - a0;
        const int64_t c_lo = std::max<int64_t>(0, t0 - hi), c_hi = std::min<int64_t>(bk - 1, t0 - lo);
        const float* src = ds + (rs + r) * lds;
        float* dst = row + lead + hi - t0;
        for (int64_t c = c_lo; c <= c_hi; ++c) dst[c] = src[c];
      }
      if constexpr (std::is_same_v<E, float>) {
        const float* rr = rrows.data_ptr<float>() + (h * Pp + x0e) * D16;
        tile::gemm_f32(isa, nr, D16, wb, dband, ldb, rr, D16, dqv + rs * D16, D16, true);
        tile::gemm_f32_at(isa, wb, D16, nr, dband, ldb, qvb + rs * qvb_ld, qvb_ld, dr + x0e * D16, D16, true);
      } else {
        const uint16_t* rr = reinterpret_cast<const uint16_t*>(rrows.data_ptr()) + (h * (Pp / 2) + x0e / 2) * 2 * D16;
        const uint16_t* prow[64];
        for (int64_t r = 0; r < nr; ++r) {
          tile::to_bf16(dband + r * ldb, dbb + r * ldb, wb);
          prow[r] = dbb + r * ldb;
        }
        tile::gemm_bf16(nr, D16, wb / 2, dbb, ldb, rr, 2 * D16, dqv + rs * D16, D16, true);
        tile::interleave_rows_bf16(prow, nr, wb, dbil, 2 * wb, wb);
        tile::gemm_bf16_at(wb, D16, (nr + 1) / 2, reinterpret_cast<const uint32_t*>(dbil), wb,
                           qvb + (rs / 2) * 2 * D16, 2 * D16, dr + x0e * D16, D16, true);
      }
    }
  }

  struct Local {
    const PackedRel* rel;
    std::vector<E> qvb;
    std::vector<float> band;
    int64_t h = 0;
    Local(const PackedRel* r, const at::TensorOptions&)
        : rel(r), qvb(r ? kBlockQ * r->Dp : 0), band(r ? kSubRows * kBandLd : 0) {}
    void begin_queries(int64_t b, int64_t h_, int64_t i0, int64_t rows) {
      h = h_;
      const Tensor& t = rel->qv;
      const E* src = reinterpret_cast<const E*>(t.data_ptr<Src>()) + b * t.stride(0) + h * t.stride(1) +
                     i0 * t.stride(2);
      const int64_t sn = t.stride(2), sd = t.stride(3), D = t.size(3);
      for (int64_t r = 0; r < rows; ++r) {
        E* dst = qvb.data() + r * rel->Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[r * sn + d * sd];
        std::fill(dst + D, dst + rel->Dp, E(0));
      }
    }
    // s (rows of ld floats) += the position logits of rows [r0, r1) of the query tile at i0 against keys a0 ...
    void add(float* s, int64_t ld, int64_t, int64_t, int64_t q0, int64_t i0, int64_t r0, int64_t r1, int64_t a0,
             int64_t bk) {
      rel->band_add(qvb.data() + r0 * rel->Dp, rel->Dp, s + r0 * ld, ld, h, q0 + i0 + r0, r1 - r0, a0, bk, kSubRows,
                    band.data(), kBandLd);
    }
  };
};

// The backward's walk over the query rows [lo, hi) that see the key tile [a0, a0 + bk), in tiles of bq_max
// rows: a tile the masks leave whole in one step, any other in sub-blocks of kSubRows rows over only the
// columns those rows see (their first column rounded down to a multiple of `align`).
// step(i0, rows, first column in the tile, columns, whole).
template <typename Step>
void walk_query_tiles(const Masks& ms, int64_t b, int64_t lo, int64_t hi, int64_t bq_max, int64_t a0, int64_t bk,
                      int64_t align, Step&& step) {
  for (int64_t i0 = lo; i0 < hi; i0 += bq_max) {
    const int64_t bq = std::min(bq_max, hi - i0);
    if (ms.fully_visible(b, i0, bq, a0, bk)) {
      step(i0, bq, int64_t(0), bk, true);
      continue;
    }
    for (int64_t r0 = 0; r0 < bq; r0 += kSubRows) {
      const int64_t r1 = std::min(bq, r0 + kSubRows);
      const tiles::Range sub = ms.visible_keys(b, i0 + r0, r1 - r0);
      const int64_t c0 = (std::max(sub.lo, a0) - a0) / align * align, c1 = std::min(sub.hi, a0 + bk) - a0;
      if (c1 > c0) step(i0 + r0, r1 - r0, c0, c1 - c0, false);
    }
  }
}

// Query rows per tile: kBlockQ, or fewer when B * H * tiles would leave threads without work (short
// sequences, few heads), down to kSubRows.
int64_t query_tile(const Problem& P) {
  const int64_t threads = at::get_num_threads(), bh = P.B * P.H;
  int64_t bq = kBlockQ;
  while (bq > kSubRows && bh * ((P.N + bq - 1) / bq) < 4 * threads) bq /= 2;
  return std::max(bq, std::min(kSubRows, kBlockQ));
}

template <typename T, typename Products, typename Rel = RelPositions<T>>
void forward_kernel(const Problem& P, const typename Products::Shared& shared, const T* slopes, const T* sinks,
                    Tensor& out, Tensor& lse, const Rel* rel = nullptr) {
  using RelLocalT = typename Rel::Local;
  const int64_t BQ = query_tile(P), n_qt = (P.N + BQ - 1) / BQ;
  const Masks& mk = P.mk;
  T* out_d = out.data_ptr<T>();
  T* lse_d = lse.data_ptr<T>();
  at::parallel_for(0, P.B * P.H * n_qt, 1, [&](int64_t begin, int64_t end) {
    Products prod(shared, P);
    std::vector<T> m(kBlockQ), l(kBlockQ);
    RelLocalT rel_local(rel, out.options());
    // Rows [r0, r1) of the tile at i0 over keys [rel0, rel0 + bk) of segment s (absolute start a0).
    const auto step = [&](int64_t b, int64_t h, int64_t hk, int64_t i0, int s, int64_t rel0, int64_t bk, int64_t a0,
                          bool full, int64_t r0, int64_t r1) {
      prod.scores(s == 0, b, hk, rel0, bk, r0, r1);
      T* s_ptr = prod.s_ptr();
      T* o_ptr = prod.o_ptr();
      if (rel) rel_local.add(s_ptr, Products::s_ld, b, h, P.Q0, i0, r0, r1, a0, bk);
      RowTerms<T> terms{static_cast<T>(P.scale), slopes ? slopes[h] : T(0), T(0), static_cast<T>(P.softcap),
                        full ? nullptr : mk.pad_at(b, a0, bk), Products::exp_avx2(shared)};
      for (int64_t r = r0; r < r1; ++r) {
        int64_t c0 = 0, c1 = bk;
        if (!full) mk.row_columns(b, i0 + r, a0, bk, &c0, &c1);
        terms.dist0 = static_cast<T>(P.Q0 + i0 + r - a0);  // qpos - kpos of column 0
        const T alpha = fwd_row(s_ptr + r * Products::s_ld, bk, c0, c1, terms, m[r], l[r]);
        if (alpha != T(1)) scale_row(o_ptr + r * prod.o_ld, P.Dv, alpha);
      }
      prod.accumulate(s == 0, b, hk, rel0, bk, r0, r1);
    };
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qt = item % n_qt, bh = item / n_qt, b = bh / P.H, h = bh % P.H, hk = h / P.group();
      const int64_t i0 = qt * BQ, bq = std::min(BQ, P.N - i0);
      prod.begin_queries(b, h, i0, bq);
      if (rel) rel_local.begin_queries(b, h, i0, bq);
      std::fill(m.begin(), m.end(), static_cast<T>(kNegInf));
      std::fill(l.begin(), l.end(), T(0));
      const tiles::Range vis = mk.visible_keys(b, i0, bq);
      const int64_t offsets[2] = {0, P.M}, lengths[2] = {P.M, P.N};
      for (int s = 0; s < 2; ++s) {
        const int64_t off = offsets[s];
        const int64_t rel_lo = std::max(vis.lo, off) - off, rel_hi = std::min(vis.hi, off + lengths[s]) - off;
        for (int64_t rel0 = Products::tile_start(rel_lo); rel0 < rel_hi; rel0 += kBlockK) {
          const int64_t bk = std::min(kBlockK, rel_hi - rel0), a0 = off + rel0;
          if (mk.all_padded(b, a0, bk)) continue;
          if (mk.fully_visible(b, i0, bq, a0, bk)) {
            step(b, h, hk, i0, s, rel0, bk, a0, true, 0, bq);
            continue;
          }
          for (int64_t r0 = 0; r0 < bq; r0 += kSubRows) {
            const int64_t r1 = std::min(bq, r0 + kSubRows);
            const tiles::Range sub = mk.visible_keys(b, i0 + r0, r1 - r0);
            const int64_t lo = Products::tile_start(std::max(sub.lo, a0) - off) + off;  // keeps rel0's alignment
            const int64_t hi = std::min(sub.hi, a0 + bk);
            if (hi <= lo) continue;  // these rows see none of this tile
            step(b, h, hk, i0, s, lo - off, hi - lo, lo, false, r0, r1);
          }
        }
      }
      // Normalise and write out (a row that saw no key: zeros; see rows::finish_row).
      const T* o_ptr = prod.o_ptr();
      for (int64_t r = 0; r < bq; ++r) {
        const auto [inv, row_lse] = rows::finish_row(m[r], l[r], sinks != nullptr, sinks ? sinks[h] : T(0));
        T* dst = out_d + ((b * P.H + h) * P.N + i0 + r) * P.Dv;
        for (int64_t d = 0; d < P.Dv; ++d) dst[d] = inv == T(0) ? T(0) : o_ptr[r * prod.o_ld + d] * inv;
        lse_d[(b * P.H + h) * P.N + i0 + r] = row_lse;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Work item: (b, h, slice of key tiles). Each item owns its key tiles' dk/dv (per query
// head; the GQA group is summed afterwards) and a private dq accumulator for its slice, so no two
// threads ever write the same memory. Slices exist only to keep threads busy when B * H is small.
// ---------------------------------------------------------------------------------------------
template <typename T>
void backward_kernel(const Problem& P, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& mk, const Tensor& mv, const T* slopes, const Tensor& lse, const Tensor& delta,
                     int64_t n_slices, Tensor& dq_part, Tensor& dk_h, Tensor& dv_h, Tensor& dmk_h, Tensor& dmv_h,
                     const RelPositions<T>* rel = nullptr, Tensor* dqv_part = nullptr, Tensor* dpos_part = nullptr) {
  const int64_t n_kt_mem = (P.M + kBlockK - 1) / kBlockK, n_kt = n_kt_mem + (P.N + kBlockK - 1) / kBlockK;
  const auto opts = q.options();
  const Masks& ms = P.mk;
  at::parallel_for(0, P.B * P.H * n_slices, 1, [&](int64_t begin, int64_t end) {
    Tensor S = at::empty({kBlockQ, kBlockK}, opts);
    Tensor dP = at::empty({kBlockQ, kBlockK}, opts);
    Tensor rel_scratch = rel ? at::empty({kSubRows, kSubRows + kBlockK}, opts) : Tensor();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slice = item % n_slices, bh = item / n_slices, b = bh / P.H, h = bh % P.H, hk = h / P.group();
      RowTerms<T> terms{static_cast<T>(P.scale), slopes ? slopes[h] : T(0), T(0), static_cast<T>(P.softcap), nullptr};
      const Tensor Qb = q[b][h], dOb = dout[b][h];
      const T* lse_b = lse[b][h].data_ptr<T>();
      const T* delta_b = delta[b][h].data_ptr<T>();
      Tensor dQb = dq_part[slice][b][h];
      Tensor dQVb = rel ? (*dqv_part)[slice][b][h] : Tensor();
      Tensor dPosb = rel ? (*dpos_part)[slice][b][h] : Tensor();
      for (int64_t kt = slice; kt < n_kt; kt += n_slices) {
        const bool in_mem = kt < n_kt_mem;
        const int64_t offset = in_mem ? 0 : P.M, len = in_mem ? P.M : P.N;
        const int64_t a0 = offset + (in_mem ? kt : kt - n_kt_mem) * kBlockK;
        const int64_t bk = std::min(kBlockK, offset + len - a0);
        const Tensor Kt = (in_mem ? mk : k)[b][hk].narrow(0, a0 - offset, bk);
        const Tensor Vt = (in_mem ? mv : v)[b][hk].narrow(0, a0 - offset, bk);
        Tensor dKt = (in_mem ? dmk_h : dk_h)[b][h].narrow(0, a0 - offset, bk);
        Tensor dVt = (in_mem ? dmv_h : dv_h)[b][h].narrow(0, a0 - offset, bk);
        if (ms.all_padded(b, a0, bk)) continue;
        const tiles::Range rows = ms.visible_queries(b, a0, bk);
        // Query rows [i0, i0 + bq) against key columns [c0k, c0k + w) of the tile (all of it when it is fully
        // visible; else per sub-block of kSubRows rows, only the columns those rows see).
        const auto step = [&](int64_t i0, int64_t bq, int64_t c0k, int64_t w, bool full) {
          const Tensor Qt = Qb.narrow(0, i0, bq), dOt = dOb.narrow(0, i0, bq);
          const Tensor Kc = Kt.narrow(0, c0k, w), Vc = Vt.narrow(0, c0k, w);
          Tensor St = S.narrow(0, 0, bq).narrow(1, 0, w), dPt = dP.narrow(0, 0, bq).narrow(1, 0, w);
          at::mm_out(St, Qt, Kc.t());
          at::mm_out(dPt, dOt, Vc.t());
          T* s_ptr = S.data_ptr<T>();
          T* dp_ptr = dP.data_ptr<T>();
          const int64_t ac = a0 + c0k;
          if (rel) rel->add(s_ptr, kBlockK, b, h, P.Q0, i0, 0, bq, ac, w, rel_scratch);
          terms.pad = full ? nullptr : ms.pad_at(b, ac, w);
          for (int64_t r = 0; r < bq; ++r) {
            int64_t c0 = 0, c1 = w;
            if (!full) ms.row_columns(b, i0 + r, ac, w, &c0, &c1);
            terms.dist0 = static_cast<T>(P.Q0 + i0 + r - ac);
            bwd_row(s_ptr + r * kBlockK, dp_ptr + r * kBlockK, w, c0, c1, terms, lse_b[i0 + r], delta_b[i0 + r]);
          }
          if (rel) rel->grad(dp_ptr, kBlockK, b, h, P.Q0, i0, bq, ac, w, dQVb, dPosb, rel_scratch);
          dVt.narrow(0, c0k, w).addmm_(St.t(), dOt);  // dV += P^T dO
          dKt.narrow(0, c0k, w).addmm_(dPt.t(), Qt);  // dK += dS^T Q   (scaled at the end)
          dQb.narrow(0, i0, bq).addmm_(dPt, Kc);      // dQ += dS K    (scaled at the end)
        };
        walk_query_tiles(ms, b, rows.lo, rows.hi, kBlockQ, a0, bk, 1, step);
      }
    }
  });
}

// Detached (worker threads run with grad mode on: the tile products must not record autograd
// history) and in the compute type; for float/double inputs a view, so strides are read in place.
Tensor compute_view(const Tensor& t, at::ScalarType ct) { return t.detach().to(ct); }

// Forward tile products through our kernels where the CPU has them (float32: AVX-512F or AVX2 +
// FMA; bfloat16: AVX-512 BF16), else through the BLAS. LONGKERNELS_CPU_TILES (cpu_features.h):
// "blas" forces the BLAS path, "avx2" the AVX2 float32 kernels (tests cover every path on one
// machine; benchmarks compare them).
enum class Tiles { Blas, F32, Bf16 };
// `f32`: f32_tiles() of this call (read once per call: it reads the environment, which tests switch).
Tiles forward_tiles(const Tensor& q, F32Tiles f32) {
  if (f32 == F32Tiles::None && has_f32_tiles()) return Tiles::Blas;  // "blas" asked for
  if (q.scalar_type() == at::kBFloat16 && has_avx512_bf16()) return Tiles::Bf16;
  // float32, and bfloat16/float16 on CPUs without AVX-512 BF16 (read as float32, as the BLAS path does)
  if (q.scalar_type() != at::kDouble && f32 != F32Tiles::None) return Tiles::F32;
  return Tiles::Blas;
}

// ---------------------------------------------------------------------------------------------
// Decode: few query rows per key/value head (decoding, speculative decoding, short chunks). Work item:
// (b, kv head, chunk of keys). The R = G * N query rows of a GQA group (G = H / Hkv heads, N queries) go
// through the chunk together, so each key and value row is read once per group, where it lies (memory or
// segment, any strides, bfloat16 / float16 as stored: no upcast copy, no packing of the whole cache), a
// block of keys at a time. A (b, kv head) is cut into chunks so that every thread has work even at
// B * Hkv = 1; the chunks' partial results are merged by their LSE (float32; float64 for float64) at the end
// (flash-decoding).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kDecodeMaxRows = 128;    // G * N: the group's rows and their accumulators stay in L2
constexpr int64_t kDecodeMaxQueries = 64;  // N
constexpr int64_t kDecodeBlock = 64;       // keys per block
constexpr int64_t kDecodeMinChunk = 512;   // keys per work item, at least (amortises the item's setup)
constexpr int64_t kRelDecodeRows = 16;     // relative positions: per-row position products (each row its band)


template <typename T, typename S>
inline T widen_to(S x) { return static_cast<T>(static_cast<std::conditional_t<std::is_same_v<S, double>, double, float>>(x)); }

// How the decode products run: bf16 dot products (AVX-512 BF16, bfloat16 inputs), float32 micro-kernels
// (AVX-512 / AVX2: float32, and bfloat16 / float16 widened as rows are read), plain loops (float64).
enum class DecodeKind { None, Bf16, F32, Loops };

// Src: the inputs' element type (float, double, at::BFloat16, at::Half); T: the accumulators' (float, or
// double for double inputs).
template <typename Src, typename T, DecodeKind kKind>
class Decoder {
 public:
  static constexpr bool kBf16 = kKind == DecodeKind::Bf16;
  using E = std::conditional_t<kBf16, uint16_t, T>;  // the products' operand type
  static constexpr int64_t kp = kBf16 ? 2 : 1;      // pairs along the reduction (bf16)

  // qv, pos: Transformer-XL relative positions (qv (B, H, N, D) as q, pos (H, P, D) of q's dtype), or null.
  Decoder(const Problem& P, F32Tiles isa, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mk,
          const Tensor& mv, const T* slopes, const Tensor* qv = nullptr, const Tensor* pos = nullptr)
      : P_(P), isa_(isa), q_(q), k_(k), v_(v), mk_(mk), mv_(mv), slopes_(slopes), qv_(qv), pos_(pos),
        R_(P.group() * P.N), Dq_(round_up(P.D, kp)), Dvp_(round_up(P.Dv, 16)) {
    static_assert(!kBf16 || std::is_same_v<Src, at::BFloat16>, "bf16 products take bfloat16 inputs");
    TORCH_INTERNAL_ASSERT(!pos_ || !kBf16, "relative positions decode on widened float32 rows");
  }

  // Keys [lo, hi) of (b, hkv), all R rows: the unnormalised output (R x Dvp), row max and row sum per row.
  void run(int64_t b, int64_t hkv, int64_t lo, int64_t hi, T* o, T* m, T* l) {
    alloc();
    load_queries(b, hkv);
    std::fill(o, o + R_ * Dvp_, T(0));
    std::fill(m, m + R_, -std::numeric_limits<T>::infinity());
    std::fill(l, l + R_, T(0));
    const Masks& ms = P_.mk;
    for (int64_t a0 = lo; a0 < hi; a0 += kDecodeBlock) {
      const int64_t bk = std::min(kDecodeBlock, hi - a0);
      if (ms.all_padded(b, a0, bk)) continue;
      const tiles::Range vis = ms.visible_keys(b, 0, P_.N);
      if (vis.hi <= a0 || vis.lo >= a0 + bk) continue;  // no query of the group sees this block
      scores(b, hkv, a0, bk);
      if (pos_) add_positions(hkv, a0, bk);
      const bool full = ms.fully_visible(b, 0, P_.N, a0, bk);
      RowTerms<T> terms{static_cast<T>(P_.scale), T(0), T(0), static_cast<T>(P_.softcap),
                        full ? nullptr : ms.pad_at(b, a0, bk),
                        std::is_same_v<T, float> && isa_ == F32Tiles::Avx2};
      for (int64_t r = 0; r < R_; ++r) {
        const int64_t g = r / P_.N, i = r % P_.N;
        int64_t c0 = 0, c1 = bk;
        if (!full) ms.row_columns(b, i, a0, bk, &c0, &c1);
        terms.slope = slopes_ ? slopes_[hkv * P_.group() + g] : T(0);
        terms.dist0 = static_cast<T>(P_.M + i - a0);
        const T alpha = fwd_row(S_.data() + r * kDecodeBlock, kDecodeBlock, c0, c1, terms, m[r], l[r]);
        if (alpha != T(1)) scale_row(o + r * Dvp_, P_.Dv, alpha);
      }
      accumulate(b, hkv, a0, bk, o);
    }
  }

 private:
  void alloc() {
    if (!Q_.empty()) return;
    Q_.assign(R_ * Dq_, E(0));
    if (pos_) QV_.assign(R_ * Dq_, E(0));
    S_.assign(R_ * kDecodeBlock, T(0));
    stage_.assign(kDecodeBlock * std::max(Dq_, Dvp_), E(0));
    if constexpr (kKind == DecodeKind::Bf16) {
      K_.assign((Dq_ / 2) * kDecodeBlock, 0u);
      Pb_.assign(R_ * kDecodeBlock, uint16_t(0));
      Vp_.assign((kDecodeBlock / 2) * 2 * Dvp_, uint16_t(0));
    } else if constexpr (kKind == DecodeKind::F32) {
      K_.assign(Dq_ * kDecodeBlock, 0u);
      Vf_.assign(kDecodeBlock * Dvp_, T(0));
    }
  }

  // The group's query rows, row r = (g, i): head hkv * G + g, query i; widened, or as bf16 bits. With relative
  // positions, qv's rows too.
  void load_queries(int64_t b, int64_t hkv) {
    const auto load = [&](const Tensor& t, E* out) {
      const RowView<Src> view(t);
      for (int64_t r = 0; r < R_; ++r) {
        const Src* src = view.row(b, hkv * P_.group() + r / P_.N, r % P_.N);
        E* dst = out + r * Dq_;
        for (int64_t d = 0; d < P_.D; ++d) dst[d] = element(src[d * view.sd]);
      }
    };
    load(q_, Q_.data());
    if (pos_) load(*qv_, QV_.data());
  }

  // S rows += <qv_r, pos[h, t]> for each column's distance t = M + i - (a0 + c): per row, dot products on
  // pos's rows where they lie (consecutive columns read consecutive rows backwards), widened when not float32
  // of unit stride. Columns whose distance lies outside [0, P) are hidden (P covers every visible distance,
  // which the op checks) and left alone.
  void add_positions(int64_t hkv, int64_t a0, int64_t bk) {
    const Tensor& pos = *pos_;
    const int64_t Pn = pos.size(1), s0 = pos.stride(0), s1 = pos.stride(1), sd = pos.stride(2);
    const Src* base = reinterpret_cast<const Src*>(pos.data_ptr());
    const bool direct = std::is_same_v<Src, E> && sd == 1;
    const E* rows[kDecodeBlock];
    for (int64_t r = 0; r < R_; ++r) {
      const int64_t h = hkv * P_.group() + r / P_.N, t0 = P_.M + r % P_.N - a0;
      const int64_t c_lo = std::max<int64_t>(0, t0 - (Pn - 1)), c_hi = std::min<int64_t>(bk - 1, t0);
      if (c_hi < c_lo) continue;
      const int64_t n = c_hi - c_lo + 1;
      for (int64_t j = 0; j < n; ++j) {
        const Src* src = base + h * s0 + (t0 - c_lo - j) * s1;
        if (direct) {
          rows[j] = reinterpret_cast<const E*>(src);
          continue;
        }
        E* dst = stage_.data() + j * Dq_;
        if constexpr (kKind == DecodeKind::F32) {
          widen_row(src, sd, P_.D, dst, Dq_);
        } else {
          for (int64_t d = 0; d < P_.D; ++d) dst[d] = element(src[d * sd]);
        }
        rows[j] = dst;
      }
      T* srow = S_.data() + r * kDecodeBlock + c_lo;
      const E* qr = QV_.data() + r * Dq_;
      if constexpr (kKind == DecodeKind::F32) {
        float part[16];
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
          const int64_t m = std::min<int64_t>(16, n - j0);
          tile::dots_f32(isa_, 1, P_.D, qr, Dq_, rows + j0, m, part, 16);
          for (int64_t j = 0; j < m; ++j) srow[j0 + j] += part[j];
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          T acc = 0;
          for (int64_t d = 0; d < P_.D; ++d) acc += qr[d] * rows[j][d];
          srow[j] += acc;
        }
      }
    }
  }

  static E element(Src x) {
    if constexpr (kBf16) {
      return x.x;  // bf16 bits, as stored
    } else {
      return widen_to<T>(x);
    }
  }

  // One row of Src (element stride sd) as `width` floats, zero past `len`; unit-stride bfloat16 rows (CPUs
  // without AVX-512 BF16) widened eight at a time.
  static void widen_row(const Src* src, int64_t sd, int64_t len, float* dst, int64_t width) {
    if constexpr (std::is_same_v<Src, at::BFloat16>) {
      if (sd == 1) {
        tile::widen_bf16(reinterpret_cast<const uint16_t*>(src), len, dst);
        std::fill(dst + len, dst + width, 0.0f);
        return;
      }
    }
    if constexpr (std::is_same_v<Src, float>) {
      if (sd == 1) {
        std::memcpy(dst, src, len * sizeof(float));
        std::fill(dst + len, dst + width, 0.0f);
        return;
      }
    }
    for (int64_t d = 0; d < len; ++d) dst[d] = widen_to<float>(src[d * sd]);
    std::fill(dst + len, dst + width, 0.0f);
  }

  template <typename X>
  static const X* row_of(const RowView<X>& mem, const RowView<X>& cur, int64_t M, int64_t b, int64_t hkv, int64_t j) {
    return j < M ? mem.row(b, hkv, j) : cur.row(b, hkv, j - M);
  }

  // Rows [a0, a0 + bk) of bfloat16 keys (or values) as their raw bits where they lie (unit stride): for the AVX2
  // products that widen them as they read. False (nothing written) where a row is strided.
  bool raw_bf16_rows(const Tensor& mem_t, const Tensor& cur_t, int64_t b, int64_t hkv, int64_t a0, int64_t bk,
                     const uint16_t** raw) const {
    const RowView<Src> cur(cur_t), mem(mem_t);
    if (cur.sd != 1 || mem.sd != 1) return false;
    for (int64_t j = 0; j < bk; ++j) raw[j] = reinterpret_cast<const uint16_t*>(row_of(mem, cur, P_.M, b, hkv, a0 + j));
    return true;
  }

  // Rows [a0, a0 + bk) of the keys (or values), as pointers to `width` contiguous elements of E (zero
  // padded past `d`): in place where they lie so (unit stride, of E itself; 32-bit aligned rows for bf16
  // pairs), else widened or gathered into the staging buffer.
  void rows_of(const Tensor& mem_t, const Tensor& cur_t, int64_t b, int64_t hkv, int64_t a0, int64_t bk, int64_t d_len,
               int64_t width, bool words, const E** rows) {
    const RowView<Src> cur(cur_t), mem(mem_t);
    const bool same = std::is_same_v<Src, E> || kBf16;
    const bool direct = same && cur.sd == 1 && mem.sd == 1 && (!words || (cur.words(d_len) && mem.words(d_len)));
    for (int64_t j = 0; j < bk; ++j) {
      const Src* src = row_of(mem, cur, P_.M, b, hkv, a0 + j);
      if (direct) {
        rows[j] = reinterpret_cast<const E*>(src);
        continue;
      }
      E* dst = stage_.data() + j * width;
      const int64_t sd = a0 + j < P_.M ? mem.sd : cur.sd;
      if constexpr (kKind == DecodeKind::F32) {
        widen_row(src, sd, d_len, dst, width);
        rows[j] = dst;
        continue;
      }
      for (int64_t d = 0; d < d_len; ++d) dst[d] = element(src[d * sd]);
      for (int64_t d = d_len; d < width; ++d) dst[d] = E(0);
      rows[j] = dst;
    }
  }

  // S = Q K^T for the block (columns past bk are left stale: fwd_row zeroes all but the visible ones).
  // Up to dot_rows() query rows: dot products on the key rows as they are (AVX-512: 4, AVX2: 8, each key row read
  // once per four rows); more: the keys transposed into a panel (Dq / kp words x 64 keys) for the micro-kernels,
  // whose register tiles then pay off. On AVX2 the panel's 6-row tiles left a 1- or 2-row tile of 2 or 4
  // accumulators, waiting on the FMA latency: Qwen2-7B's 7 rows per kv head, decode over 32k on the Zen 1 EPYC,
  // with the dot products and the P V split below 1.3x faster (float32 and bfloat16).
  static constexpr int64_t kDotRows = 4, kDotRowsAvx2 = 8;
  int64_t dot_rows() const { return isa_ == F32Tiles::Avx2 ? kDotRowsAvx2 : kDotRows; }
  void scores(int64_t b, int64_t hkv, int64_t a0, int64_t bk) {
    if constexpr (kKind == DecodeKind::F32 && std::is_same_v<Src, at::BFloat16>) {
      // bfloat16 keys on AVX2: the dot products widen each key row as they read it (no widened copy first).
      const uint16_t* raw[kDecodeBlock];
      if (isa_ == F32Tiles::Avx2 && R_ <= dot_rows() && raw_bf16_rows(mk_, k_, b, hkv, a0, bk, raw)) {
        tile::dots_bf16_rows_avx2(R_, P_.D, Q_.data(), Dq_, raw, bk, S_.data(), kDecodeBlock);
        return;
      }
    }
    const E* rows[kDecodeBlock];
    rows_of(mk_, k_, b, hkv, a0, bk, P_.D, Dq_, kBf16, rows);
    if constexpr (kKind == DecodeKind::Loops) {
      for (int64_t r = 0; r < R_; ++r) {
        const E* qr = Q_.data() + r * Dq_;
        for (int64_t j = 0; j < bk; ++j) {
          T acc = 0;
          for (int64_t d = 0; d < P_.D; ++d) acc += qr[d] * rows[j][d];
          S_[r * kDecodeBlock + j] = acc;
        }
      }
      return;
    } else {
      if (R_ <= dot_rows()) {
        for (int64_t j0 = 0; j0 < bk; j0 += 16) {
          const int64_t n = std::min<int64_t>(16, bk - j0);
          if constexpr (kBf16) {
            tile::dots_bf16(R_, P_.D, Q_.data(), Dq_, rows + j0, n, S_.data() + j0, kDecodeBlock);
          } else {
            tile::dots_f32(isa_, R_, P_.D, Q_.data(), Dq_, rows + j0, n, S_.data() + j0, kDecodeBlock);
          }
        }
        return;
      }
      tile::transpose32(isa_, reinterpret_cast<const uint32_t* const*>(rows), bk, Dq_ / kp, K_.data(), kDecodeBlock,
                        kDecodeBlock);
      if constexpr (kBf16) {
        tile::gemm_bf16(R_, kDecodeBlock, Dq_ / 2, Q_.data(), Dq_, reinterpret_cast<const uint16_t*>(K_.data()),
                        2 * kDecodeBlock, S_.data(), kDecodeBlock, false);
      } else {
        tile::gemm_f32(isa_, R_, kDecodeBlock, Dq_, Q_.data(), Dq_, reinterpret_cast<const float*>(K_.data()),
                       kDecodeBlock, S_.data(), kDecodeBlock, false);
      }
    }
  }

  // O += P V over the block's values (P in S_, zero past the visible columns).
  void accumulate(int64_t b, int64_t hkv, int64_t a0, int64_t bk, T* o) {
    const E* rows[kDecodeBlock];
    if constexpr (kKind == DecodeKind::Loops) {
      rows_of(mv_, v_, b, hkv, a0, bk, P_.Dv, Dvp_, false, rows);
      for (int64_t r = 0; r < R_; ++r) {
        T* orow = o + r * Dvp_;
        const T* p = S_.data() + r * kDecodeBlock;
        for (int64_t j = 0; j < bk; ++j)
          for (int64_t d = 0; d < P_.Dv; ++d) orow[d] += p[j] * rows[j][d];
      }
    } else if constexpr (kBf16) {
      rows_of(mv_, v_, b, hkv, a0, bk, P_.Dv, Dvp_, false, rows);
      tile::interleave_rows_bf16(rows, bk, P_.Dv, Vp_.data(), 2 * Dvp_, Dvp_);
      const int64_t pairs = (bk + 1) / 2;  // P rounded to bf16 for P V, as the forward's packed path does
      for (int64_t r = 0; r < R_; ++r) tile::to_bf16(S_.data() + r * kDecodeBlock, Pb_.data() + r * kDecodeBlock, 2 * pairs);
      tile::gemm_bf16(R_, Dvp_, pairs, Pb_.data(), kDecodeBlock, Vp_.data(), 2 * Dvp_, o, Dvp_, true);
    } else {
      if constexpr (std::is_same_v<Src, at::BFloat16>) {
        // One query row over bfloat16 values on AVX2: the product reads the rows where they lie, widening as it
        // goes (no widened copy of the block). h8 d64 decode over 16k, Zen 1 EPYC: 12-16% faster; with more
        // rows each row is read in more, narrower panels and the copy below measured as fast or faster.
        const uint16_t* raw[kDecodeBlock];
        if (isa_ == F32Tiles::Avx2 && R_ == 1 && raw_bf16_rows(mv_, v_, b, hkv, a0, bk, raw)) {
          tile::pv_bf16_row_avx2(P_.Dv, S_.data(), raw, bk, o);
          return;
        }
      }
      // Values as the B panel: in place when they are float32 rows of a whole number of 16-column groups
      // that do not straddle memory and segment, and the product reads each row whole in one or two tiles;
      // else widened (copied) into a padded block first. The AVX2 products of three or more rows walk the
      // block in 16-column panels, one cache line of every row per panel: straight from memory that stalled
      // on each line (Llama-3-8B's 4 rows per kv head: the copy, read in row order, made decode 15% faster
      // on the Zen 1 EPYC; with one or two rows, 64- and 32-column tiles, the copy cost 2-20%).
      const RowView<Src> cur(v_), mem(mv_);
      const bool straddles = a0 < P_.M && a0 + bk > P_.M;
      const RowView<Src>& seg = a0 < P_.M ? mem : cur;
      const float* vrows = Vf_.data();
      int64_t ld = Dvp_;
      const bool whole_rows = isa_ == F32Tiles::Avx512 || R_ <= 2;
      if (std::is_same_v<Src, float> && !straddles && seg.sd == 1 && P_.Dv % 16 == 0 && whole_rows) {
        vrows = reinterpret_cast<const float*>(row_of(mem, cur, P_.M, b, hkv, a0));
        ld = seg.sl;
      } else {
        for (int64_t j = 0; j < bk; ++j) {
          const Src* src = row_of(mem, cur, P_.M, b, hkv, a0 + j);
          const int64_t sd = a0 + j < P_.M ? mem.sd : cur.sd;
          widen_row(src, sd, P_.Dv, Vf_.data() + j * Dvp_, Dvp_);
        }
      }
      if (isa_ == F32Tiles::Avx2 && R_ > 4 && R_ <= kDotRowsAvx2) {
        // Five to eight rows on AVX2: two tiles of 2 to 4 rows (6 or 8 accumulators each), not the 6-row tile
        // and a 1- or 2-row one (which also copied each 16-column panel of the block first).
        const int64_t r1 = (R_ + 1) / 2;
        tile::gemm_f32(isa_, r1, Dvp_, bk, S_.data(), kDecodeBlock, vrows, ld, o, Dvp_, true);
        tile::gemm_f32(isa_, R_ - r1, Dvp_, bk, S_.data() + r1 * kDecodeBlock, kDecodeBlock, vrows, ld, o + r1 * Dvp_,
                       Dvp_, true);
        return;
      }
      tile::gemm_f32(isa_, R_, Dvp_, bk, S_.data(), kDecodeBlock, vrows, ld, o, Dvp_, true);
    }
  }

  const Problem& P_;
  F32Tiles isa_;
  const Tensor &q_, &k_, &v_, &mk_, &mv_;
  const T* slopes_;
  const Tensor *qv_, *pos_;
  int64_t R_, Dq_, Dvp_;
  std::vector<E> Q_, QV_, stage_;
  std::vector<T> S_, Vf_;
  std::vector<uint32_t> K_;
  std::vector<uint16_t> Pb_, Vp_;
};

// Whether the decode path takes this call, and with which products. LONGKERNELS_CPU_TILES=blas (f32 None on a
// machine with the tile kernels) keeps every call on the BLAS tiles, the portable path tests compare with.
DecodeKind decode_kind(const Problem& P, at::ScalarType t, F32Tiles f32) {
  if (P.Q0 != P.M) return DecodeKind::None;  // a ring step's block pair: the tiles take any offset
  if (P.N > kDecodeMaxQueries || P.group() * P.N > kDecodeMaxRows) return DecodeKind::None;
  if (t == at::kDouble) return f32 == F32Tiles::None && has_f32_tiles() ? DecodeKind::None : DecodeKind::Loops;
  if (f32 == F32Tiles::None) return DecodeKind::None;
  if (t == at::kBFloat16 && has_avx512_bf16()) return DecodeKind::Bf16;
  return DecodeKind::F32;  // float32, and bfloat16 / float16 widened
}

// Chunks per (b, kv head): enough items for every thread (4 each), chunks of at least kDecodeMinChunk keys,
// aligned to whole blocks.
int64_t decode_chunk(const Problem& P, int64_t keys) {
  const int64_t threads = at::get_num_threads(), groups = P.B * P.Hkv;
  int64_t chunks = std::max<int64_t>(1, (4 * threads + groups - 1) / groups);
  chunks = std::min(chunks, std::max<int64_t>(1, keys / kDecodeMinChunk));
  return round_up((keys + chunks - 1) / chunks, kDecodeBlock);
}

template <typename Src, typename T, DecodeKind kKind>
void decode_forward(const Problem& P, F32Tiles isa, const Tensor& q, const Tensor& k, const Tensor& v,
                    const Tensor& mk, const Tensor& mv, const T* slopes, const T* sinks, Tensor& out, Tensor& lse,
                    const Tensor* qv = nullptr, const Tensor* pos = nullptr) {
  // Keys any of the group's queries sees: [lo, M + N) (causal or not, the window bounds the start).
  const int64_t lo = (P.window && P.causal) ? std::max<int64_t>(0, P.M - P.window + 1) : 0;
  const int64_t hi = P.M + P.N, keys = hi - lo;
  const int64_t chunk = decode_chunk(P, keys), n_chunks = (keys + chunk - 1) / chunk;
  const int64_t R = P.group() * P.N, Dvp = round_up(P.Dv, 16), G = P.group(), stride = R * (Dvp + 2);
  std::vector<T> part(P.B * P.Hkv * n_chunks * stride);  // per item, R rows of (o[Dvp]), then m[R], l[R]
  at::parallel_for(0, P.B * P.Hkv * n_chunks, 1, [&](int64_t begin, int64_t end) {
    Decoder<Src, T, kKind> dec(P, isa, q, k, v, mk, mv, slopes, qv, pos);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % n_chunks, bh = item / n_chunks, b = bh / P.Hkv, hkv = bh % P.Hkv;
      T* base = part.data() + item * stride;
      const int64_t a0 = lo + c * chunk;
      dec.run(b, hkv, a0, std::min(hi, a0 + chunk), base, base + R * Dvp, base + R * Dvp + R);
    }
  });
  // Merge the chunks of every row by their LSE; a NaN max stays NaN (std::max would drop it).
  T* out_d = out.data_ptr<T>();
  T* lse_d = lse.data_ptr<T>();
  constexpr T kInf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, P.B * P.Hkv * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(P.Dv);
    for (int64_t x = begin; x < end; ++x) {
      const int64_t r = x % R, bh = x / R, b = bh / P.Hkv, hkv = bh % P.Hkv;
      const int64_t h = hkv * G + r / P.N, i = r % P.N;
      const T* first = part.data() + bh * n_chunks * stride;
      T mx = -kInf;
      bool nan = false;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const T mc = first[c * stride + R * Dvp + r];
        nan |= mc != mc;
        mx = std::max(mx, mc);
      }
      if (nan) mx = std::numeric_limits<T>::quiet_NaN();
      T den = 0;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t c = 0; c < n_chunks; ++c) {
        const T* base = first + c * stride;
        const T mc = base[R * Dvp + r], lc = base[R * Dvp + R + r];
        if (mc == -kInf) continue;  // the chunk holds no key this row sees
        const T w = n_chunks == 1 ? T(1) : std::exp(mc - mx);
        den += w * lc;
        const T* oc = base + r * Dvp;
        for (int64_t d = 0; d < P.Dv; ++d) acc[d] += w * oc[d];
      }
      T* dst = out_d + ((b * P.H + h) * P.N + i) * P.Dv;
      const auto [inv, row_lse] = rows::finish_row(mx, den, sinks != nullptr, sinks ? sinks[h] : T(0));
      for (int64_t d = 0; d < P.Dv; ++d) dst[d] = inv == T(0) ? T(0) : acc[d] * inv;
      lse_d[(b * P.H + h) * P.N + i] = row_lse;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward on our micro-kernels: bfloat16 (AVX-512 BF16: the five tile products as bf16 dot products with
// float32 accumulation, P and dS rounded to bf16 for their products as FlashAttention does, on the inputs as
// stored) or float32 (AVX-512 or AVX2 FMA). Work items as in backward_kernel: (b, h, slice of key tiles); each
// owns its key tiles' dk/dv and a private dq, so no two threads write the same memory. Operands (tile_gemm.h):
//   S  = Q K^T     A: Q rows                       B: K^T panel (the tile's key rows transposed)
//   dP = dO V^T    A: dO rows                      B: V^T panel
//   dV += P^T dO   A: P transposed (float32: P's rows read as columns; bf16: P's rows interleaved into pairs)
//                  B: dO rows (bf16: interleaved into pairs along rows)
//   dK += dS^T Q   as dV, with dS and Q
//   dQ += dS K     A: dS rows                      B: K rows (bf16: interleaved into pairs along rows)
// Q and dO are laid out once per item for the whole head; keys and values once per key tile.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kBwdQ = 128, kBwdK = 128;

// One head's rows of a (B, H, L, d) tensor for the products: in place where the layout allows (unit stride
// along d; bf16: d even, for pairs; `pad`: d a multiple of 16, for a B operand's 16-column loads), else copied
// contiguous with d padded (to 2 or 16).
template <typename E>
struct HeadRows {
  const E* rows = nullptr;
  int64_t ld = 0;
  std::vector<E> copy;
  void take(const Tensor& t, int64_t b, int64_t h, int64_t d, bool pad) {
    using Src = std::conditional_t<std::is_same_v<E, float>, float, at::BFloat16>;
    const RowView<Src> view(t);
    const int64_t L = t.size(2), width = pad ? round_up(d, 16) : round_up(d, std::is_same_v<E, float> ? 1 : 2);
    if (view.sd == 1 && d == width) {
      rows = reinterpret_cast<const E*>(view.row(b, h, 0));
      ld = view.sl;
      return;
    }
    copy.assign(L * width, E(0));
    for (int64_t j = 0; j < L; ++j) {
      const Src* src = view.row(b, h, j);
      for (int64_t x = 0; x < d; ++x) {
        if constexpr (std::is_same_v<E, float>) {
          copy[j * width + x] = src[x * view.sd];
        } else {
          copy[j * width + x] = src[x * view.sd].x;
        }
      }
    }
    rows = copy.data();
    ld = width;
  }
  const E* row(int64_t j) const { return rows + j * ld; }
};

constexpr int64_t kBwdBandRows = 24;  // the position band's sub-blocks: the band is kBwdBandRows - 1 wider than a tile
constexpr int64_t kBwdBandLd = kBwdK + kBwdBandRows + 16;

template <typename E>
void backward_tiles(const Problem& P, F32Tiles isa, const Tensor& dout, const Tensor& q, const Tensor& k,
                    const Tensor& v, const Tensor& mk, const Tensor& mv, const float* slopes, const float* lse,
                    const float* delta, int64_t n_slices, Tensor& dq_part, Tensor& dk_h, Tensor& dv_h, Tensor& dmk_h,
                    Tensor& dmv_h, const PackedRel<E>* rel = nullptr, Tensor* dqv_part = nullptr,
                    Tensor* dpos_part = nullptr) {
  constexpr bool kBf16 = std::is_same_v<E, uint16_t>;
  constexpr int64_t kp = kBf16 ? 2 : 1;
  using Src = std::conditional_t<kBf16, at::BFloat16, float>;
  const int64_t n_kt_mem = (P.M + kBwdK - 1) / kBwdK, n_kt = n_kt_mem + (P.N + kBwdK - 1) / kBwdK;
  const int64_t Dq = round_up(P.D, kp), Dvq = round_up(P.Dv, kp), Dp = round_up(P.D, 16), Dvp = round_up(P.Dv, 16);
  const int64_t Kp = kBwdK + 16;  // panel width in keys (a sub-block's columns start on a multiple of 16)
  const Masks& ms = P.mk;
  const auto gemm = [&](int64_t M, int64_t N, int64_t K, const E* A, int64_t lda, const E* B, int64_t ldb, float* C,
                        int64_t ldc, bool acc) {
    if constexpr (kBf16) {
      tile::gemm_bf16(M, N, K, A, lda, B, ldb, C, ldc, acc);
    } else {
      tile::gemm_f32(isa, M, N, K, A, lda, B, ldb, C, ldc, acc);
    }
  };
  at::parallel_for(0, P.B * P.H * n_slices, 1, [&](int64_t begin, int64_t end) {
    HeadRows<E> Qa, dOa, Qb, dOb;  // A operands (S, dP) and B operands (dK, dV) of the head
    std::vector<uint16_t> Qil, dOil;  // bf16: the head's Q and dO rows interleaved into pairs along rows
    std::vector<uint32_t> Kt((Dq / kp) * Kp), Vt((Dvq / kp) * Kp);  // panels, 32-bit words
    std::vector<E> Kb(Kp * Dp);  // dQ's B: the tile's key rows (bf16: interleaved, (Kp / 2) x Dp x 2)
    std::vector<float> S(kBwdQ * Kp), dP(kBwdQ * Kp), dK(Kp * Dp), dV(Kp * Dvp), dQ;
    std::vector<uint16_t> Pb, dSb, Pil, dSil;
    if constexpr (kBf16) {
      Pb.resize(kBwdQ * Kp), dSb.resize(kBwdQ * Kp), Pil.resize((kBwdQ / 2 + 1) * 2 * Kp);
      dSil.resize((kBwdQ / 2 + 1) * 2 * Kp);
    }
    std::vector<E> stage(Kp * std::max(Dp, Dvp));
    std::vector<const E*> rows(std::max<int64_t>(P.N, Kp));
    // Relative positions: the head's qv rows (A operand of the band product; B operand of dR), dQV, dR by reversed
    // distance, and the band's scratch.
    HeadRows<E> QVa, QVb;
    std::vector<uint16_t> QVil;
    std::vector<float> dQV, dR, band(rel ? kBwdBandRows * kBwdBandLd : 0);
    std::vector<uint16_t> dbb(rel && kBf16 ? kBwdBandRows * kBwdBandLd : 0);
    std::vector<uint16_t> dbil(rel && kBf16 ? (kBwdBandRows / 2 + 1) * 2 * kBwdBandLd : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slice = item % n_slices, bh = item / n_slices, b = bh / P.H, h = bh % P.H, hk = h / P.group();
      RowTerms<float> terms{static_cast<float>(P.scale), slopes ? slopes[h] : 0.0f, 0.0f,
                            static_cast<float>(P.softcap), nullptr, isa == F32Tiles::Avx2};
      const float* lse_b = lse + bh * P.N;
      const float* delta_b = delta + bh * P.N;
      Qa.take(q, b, h, P.D, false);
      dOa.take(dout, b, h, P.Dv, false);
      if constexpr (kBf16) {
        const int64_t pairs_n = (P.N + 1) / 2;
        Qil.assign(pairs_n * 2 * Dp, uint16_t(0));
        dOil.assign(pairs_n * 2 * Dvp, uint16_t(0));
        for (int64_t i = 0; i < P.N; ++i) rows[i] = Qa.row(i);
        tile::interleave_rows_bf16(rows.data(), P.N, P.D, Qil.data(), 2 * Dp, Dp);
        for (int64_t i = 0; i < P.N; ++i) rows[i] = dOa.row(i);
        tile::interleave_rows_bf16(rows.data(), P.N, P.Dv, dOil.data(), 2 * Dvp, Dvp);
      } else {
        Qb.take(q, b, h, P.D, true);
        dOb.take(dout, b, h, P.Dv, true);
      }
      dQ.assign(P.N * Dp, 0.0f);
      if (rel) {
        QVa.take(rel->qv, b, h, P.D, false);
        if constexpr (kBf16) {
          QVil.assign(((P.N + 1) / 2) * 2 * Dp, uint16_t(0));
          for (int64_t i = 0; i < P.N; ++i) rows[i] = QVa.row(i);
          tile::interleave_rows_bf16(rows.data(), P.N, P.D, QVil.data(), 2 * Dp, Dp);
        } else {
          QVb.take(rel->qv, b, h, P.D, true);
        }
        dQV.assign(P.N * Dp, 0.0f);
        dR.assign(rel->Pp * Dp, 0.0f);
      }
      for (int64_t kt = slice; kt < n_kt; kt += n_slices) {
        const bool in_mem = kt < n_kt_mem;
        const int64_t offset = in_mem ? 0 : P.M, len = in_mem ? P.M : P.N;
        const int64_t a0 = offset + (in_mem ? kt : kt - n_kt_mem) * kBwdK;
        const int64_t bk = std::min(kBwdK, offset + len - a0);
        if (ms.all_padded(b, a0, bk)) continue;
        const tiles::Range qrows = ms.visible_queries(b, a0, bk);
        if (qrows.hi <= qrows.lo) continue;
        // The tile's keys and values: transposed panels (S, dP) and, for the keys, dQ's B operand.
        const auto layout = [&](const Tensor& t, int64_t d, int64_t dq, std::vector<uint32_t>& panel, bool keys) {
          const RowView<Src> view(t);
          const bool direct = kBf16 ? view.words(d) : view.sd == 1;
          for (int64_t j = 0; j < bk; ++j) {
            const Src* src = view.row(b, hk, a0 - offset + j);
            if (direct) {
              rows[j] = reinterpret_cast<const E*>(src);
              continue;
            }
            E* dst = stage.data() + j * dq;
            for (int64_t x = 0; x < d; ++x) {
              if constexpr (kBf16) {
                dst[x] = src[x * view.sd].x;
              } else {
                dst[x] = src[x * view.sd];
              }
            }
            for (int64_t x = d; x < dq; ++x) dst[x] = E(0);
            rows[j] = dst;
          }
          tile::transpose32(kBf16 ? F32Tiles::Avx512 : isa, reinterpret_cast<const uint32_t* const*>(rows.data()), bk,
                            dq / kp, panel.data(), Kp, Kp);
          if (!keys) return;
          if constexpr (kBf16) {
            tile::interleave_rows_bf16(rows.data(), bk, d, Kb.data(), 2 * Dp, Dp);
          } else {
            for (int64_t j = 0; j < bk; ++j) {
              std::copy(rows[j], rows[j] + d, Kb.data() + j * Dp);
              std::fill(Kb.data() + j * Dp + d, Kb.data() + (j + 1) * Dp, 0.0f);
            }
          }
        };
        layout(in_mem ? mk : k, P.D, Dq, Kt, true);
        layout(in_mem ? mv : v, P.Dv, Dvq, Vt, false);
        std::fill(dK.begin(), dK.end(), 0.0f);
        std::fill(dV.begin(), dV.end(), 0.0f);
        // Query rows [i0, i0 + bq) (i0 even) against key columns [c0k, c0k + w) of the tile (c0k a multiple of 16).
        const auto step = [&](int64_t i0, int64_t bq, int64_t c0k, int64_t w, bool full) {
          const int64_t wp = round_up(w, 16);
          const E* ktp = reinterpret_cast<const E*>(Kt.data()) + kp * c0k;
          const E* vtp = reinterpret_cast<const E*>(Vt.data()) + kp * c0k;
          gemm(bq, wp, Dq / kp, Qa.row(i0), Qa.ld, ktp, kp * Kp, S.data(), Kp, false);
          gemm(bq, wp, Dvq / kp, dOa.row(i0), dOa.ld, vtp, kp * Kp, dP.data(), Kp, false);
          const int64_t ac = a0 + c0k;
          if (rel)
            rel->band_add(QVa.row(i0), QVa.ld, S.data(), Kp, h, P.Q0 + i0, bq, ac, w, kBwdBandRows, band.data(),
                          kBwdBandLd);
          terms.pad = full ? nullptr : ms.pad_at(b, ac, w);
          for (int64_t r = 0; r < bq; ++r) {
            int64_t c0 = 0, c1 = w;
            if (!full) ms.row_columns(b, i0 + r, ac, w, &c0, &c1);
            terms.dist0 = static_cast<float>(P.Q0 + i0 + r - ac);
            bwd_row(S.data() + r * Kp, dP.data() + r * Kp, wp, c0, c1, terms, lse_b[i0 + r], delta_b[i0 + r]);
          }
          if (rel) {
            const E* qvb = kBf16 ? reinterpret_cast<const E*>(QVil.data()) + (i0 / 2) * 2 * Dp : QVb.row(i0);
            rel->band_grad(dP.data(), Kp, h, P.Q0 + i0, bq, ac, w, kBwdBandRows, qvb, kBf16 ? 2 * Dp : QVb.ld,
                           dQV.data() + i0 * Dp, dR.data(), band.data(), dbb.data(), dbil.data(), kBwdBandLd);
          }
          if constexpr (kBf16) {
            const int64_t pq = (bq + 1) / 2;
            for (int64_t r = 0; r < bq; ++r) {
              tile::to_bf16(S.data() + r * Kp, Pb.data() + r * Kp, wp);
              tile::to_bf16(dP.data() + r * Kp, dSb.data() + r * Kp, wp);
            }
            const uint16_t* prow[kBwdQ];
            for (int64_t r = 0; r < bq; ++r) prow[r] = Pb.data() + r * Kp;
            tile::interleave_rows_bf16(prow, bq, wp, Pil.data(), 2 * wp, wp);
            for (int64_t r = 0; r < bq; ++r) prow[r] = dSb.data() + r * Kp;
            tile::interleave_rows_bf16(prow, bq, wp, dSil.data(), 2 * wp, wp);
            tile::gemm_bf16_at(w, Dvp, pq, reinterpret_cast<const uint32_t*>(Pil.data()), wp,
                               dOil.data() + (i0 / 2) * 2 * Dvp, 2 * Dvp, dV.data() + c0k * Dvp, Dvp, true);
            tile::gemm_bf16_at(w, Dp, pq, reinterpret_cast<const uint32_t*>(dSil.data()), wp,
                               Qil.data() + (i0 / 2) * 2 * Dp, 2 * Dp, dK.data() + c0k * Dp, Dp, true);
            tile::gemm_bf16(bq, Dp, wp / 2, dSb.data(), Kp, Kb.data() + (c0k / 2) * 2 * Dp, 2 * Dp,
                            dQ.data() + i0 * Dp, Dp, true);
          } else {
            // P and dS as the transposed A operands, read column by column where they lie.
            tile::gemm_f32_at(isa, w, Dvp, bq, S.data(), Kp, dOb.row(i0), dOb.ld, dV.data() + c0k * Dvp, Dvp, true);
            tile::gemm_f32_at(isa, w, Dp, bq, dP.data(), Kp, Qb.row(i0), Qb.ld, dK.data() + c0k * Dp, Dp, true);
            tile::gemm_f32(isa, bq, Dp, w, dP.data(), Kp, Kb.data() + c0k * Dp, Dp, dQ.data() + i0 * Dp, Dp, true);
          }
        };
        // i0 even (bf16 pairs rows); columns from a multiple of 16 (the panels' column groups).
        walk_query_tiles(ms, b, qrows.lo & ~int64_t(1), qrows.hi, kBwdQ, a0, bk, 16, step);
        // The tile's key gradients, per query head (the GQA group is summed afterwards).
        float* dk_d = (in_mem ? dmk_h : dk_h)[b][h].data_ptr<float>() + (a0 - offset) * P.D;
        float* dv_d = (in_mem ? dmv_h : dv_h)[b][h].data_ptr<float>() + (a0 - offset) * P.Dv;
        for (int64_t j = 0; j < bk; ++j) {
          for (int64_t x = 0; x < P.D; ++x) dk_d[j * P.D + x] += dK[j * Dp + x];
          for (int64_t x = 0; x < P.Dv; ++x) dv_d[j * P.Dv + x] += dV[j * Dvp + x];
        }
      }
      float* dq_d = dq_part[slice][b][h].data_ptr<float>();
      for (int64_t i = 0; i < P.N; ++i)
        for (int64_t x = 0; x < P.D; ++x) dq_d[i * P.D + x] += dQ[i * Dp + x];
      if (rel) {
        float* dqv_d = (*dqv_part)[slice][b][h].data_ptr<float>();
        for (int64_t i = 0; i < P.N; ++i)
          for (int64_t x = 0; x < P.D; ++x) dqv_d[i * P.D + x] += dQV[i * Dp + x];
        float* dpos_d = (*dpos_part)[slice][b][h].data_ptr<float>();  // distance d is reversed row P - 1 - d
        for (int64_t d = 0; d < rel->P; ++d)
          for (int64_t x = 0; x < P.D; ++x) dpos_d[d * P.D + x] += dR[(rel->P - 1 - d) * Dp + x];
      }
    }
  });
}

Tensor optional_slopes(const std::optional<Tensor>& alibi, at::ScalarType ct) {
  if (!alibi.has_value()) return Tensor();
  return alibi->to(ct).contiguous();
}

std::tuple<Tensor, Tensor> memory_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k,
                                                const Tensor& mem_v, const std::optional<Tensor>& alibi_slopes,
                                                bool causal, int64_t window, double scale,
                                                const std::optional<Tensor>& key_padding_mask,
                                                const std::optional<Tensor>& document_ids, double softcap,
                                                const std::optional<Tensor>& sinks, std::optional<int64_t> q_offset) {
  const auto dims =
      checks::memory_attention("memory_attention_fwd", q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset);
  checks::memory_attention_masks("memory_attention_fwd", dims, q.device(), key_padding_mask, document_ids, softcap,
                                 &sinks);
  MaskBuffers buffers;
  const Problem P = describe(q, k, v, mem_k, dims.Q0, causal, dims.window, scale, key_padding_mask, document_ids,
                             softcap, buffers);
  const auto ct = compute_type(q.scalar_type());
  const Tensor slopes = optional_slopes(alibi_slopes, ct);
  const Tensor sinks_c = optional_slopes(sinks, ct);
  Tensor out = at::empty({P.B, P.H, P.N, P.Dv}, q.options().dtype(ct));
  Tensor lse = at::empty({P.B, P.H, P.N}, q.options().dtype(ct));
  const F32Tiles f32 = f32_tiles();
  const DecodeKind decode = decode_kind(P, q.scalar_type(), f32);
  if (decode != DecodeKind::None) {
    if (decode == DecodeKind::Loops) {
      decode_forward<double, double, DecodeKind::Loops>(P, f32, q, k, v, mem_k, mem_v,
                                                        slopes.defined() ? slopes.data_ptr<double>() : nullptr,
                                                        sinks_c.defined() ? sinks_c.data_ptr<double>() : nullptr,
                                                        out, lse);
      return {out, lse};
    }
    const float* sl = slopes.defined() ? slopes.data_ptr<float>() : nullptr;
    const float* sk = sinks_c.defined() ? sinks_c.data_ptr<float>() : nullptr;
    if (decode == DecodeKind::Bf16) {
      decode_forward<at::BFloat16, float, DecodeKind::Bf16>(P, f32, q, k, v, mem_k, mem_v, sl, sk, out, lse);
    } else if (q.scalar_type() == at::kFloat) {
      decode_forward<float, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, sl, sk, out, lse);
    } else if (q.scalar_type() == at::kBFloat16) {
      decode_forward<at::BFloat16, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, sl, sk, out, lse);
    } else {
      decode_forward<at::Half, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, sl, sk, out, lse);
    }
    return {out.to(q.scalar_type()), lse};
  }
  const Tiles tiles_kind = forward_tiles(q, f32);
  if (tiles_kind == Tiles::Bf16) {
    const PackedProducts<uint16_t>::Shared shared(P, F32Tiles::None, q, k, v, mem_k, mem_v);
    forward_kernel<float, PackedProducts<uint16_t>>(P, shared, slopes.defined() ? slopes.data_ptr<float>() : nullptr,
                                                    sinks_c.defined() ? sinks_c.data_ptr<float>() : nullptr, out, lse);
  } else if (tiles_kind == Tiles::F32) {
    const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
    const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct);
    const PackedProducts<float>::Shared shared(P, f32, qc, kc, vc, mkc, mvc);
    forward_kernel<float, PackedProducts<float>>(P, shared, slopes.defined() ? slopes.data_ptr<float>() : nullptr,
                                                 sinks_c.defined() ? sinks_c.data_ptr<float>() : nullptr, out, lse);
  } else {
    const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
    const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct);
    AT_DISPATCH_FLOATING_TYPES(ct, "memory_attention_fwd_cpu", [&] {
      const typename BlasProducts<scalar_t>::Shared shared{qc, kc, vc, mkc, mvc};
      forward_kernel<scalar_t, BlasProducts<scalar_t>>(
          P, shared, slopes.defined() ? slopes.data_ptr<scalar_t>() : nullptr,
          sinks_c.defined() ? sinks_c.data_ptr<scalar_t>() : nullptr, out, lse);
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> memory_attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k, const Tensor& mem_v,
    const std::optional<Tensor>& alibi_slopes, const Tensor& lse, const Tensor& delta, bool causal, int64_t window,
    double scale, const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& document_ids,
    double softcap, std::optional<int64_t> q_offset) {
  const auto dims =
      checks::memory_attention("memory_attention_bwd", q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset);
  checks::memory_attention_grads("memory_attention_bwd", dims, q, dout, lse, delta);
  checks::memory_attention_masks("memory_attention_bwd", dims, q.device(), key_padding_mask, document_ids, softcap,
                                 nullptr);
  MaskBuffers buffers;
  const Problem P = describe(q, k, v, mem_k, dims.Q0, causal, dims.window, scale, key_padding_mask, document_ids,
                             softcap, buffers);
  const auto ct = compute_type(q.scalar_type());
  const Tensor lsec = compute_view(lse, ct).contiguous(), deltac = compute_view(delta, ct).contiguous();
  const Tensor slopes = optional_slopes(alibi_slopes, ct);

  // Our micro-kernels where the CPU has them (bf16 with AVX-512 BF16 on the inputs as stored; float32, and
  // float16 / bf16 without BF16 widened, with AVX-512 or AVX2 FMA); else, and for float64, the BLAS tiles.
  const F32Tiles f32 = f32_tiles();
  const bool bf16 = q.scalar_type() == at::kBFloat16 && has_avx512_bf16() && f32 != F32Tiles::None;
  const bool tiles_f32 = !bf16 && ct == at::kFloat && f32 != F32Tiles::None;
  const int64_t threads = at::get_num_threads(), bh = P.B * P.H, tile_k = (bf16 || tiles_f32) ? kBwdK : kBlockK;
  const int64_t n_kt = (P.M + tile_k - 1) / tile_k + (P.N + tile_k - 1) / tile_k;
  // Split key tiles into slices only when (b, h) items alone would leave threads idle.
  int64_t n_slices = 1;
  if (bh % threads != 0 && bh < 4 * threads) n_slices = std::min(n_kt, (2 * threads + bh - 1) / bh);
  const auto copts = q.options().dtype(ct);
  Tensor dq_part = at::zeros({n_slices, P.B, P.H, P.N, P.D}, copts);
  Tensor dk_h = at::zeros({P.B, P.H, P.N, P.D}, copts), dv_h = at::zeros({P.B, P.H, P.N, P.Dv}, copts);
  Tensor dmk_h = at::zeros({P.B, P.H, P.M, P.D}, copts), dmv_h = at::zeros({P.B, P.H, P.M, P.Dv}, copts);
  if (bf16) {
    backward_tiles<uint16_t>(P, f32, dout.to(at::kBFloat16), q, k, v, mem_k, mem_v,
                             slopes.defined() ? slopes.data_ptr<float>() : nullptr, lsec.data_ptr<float>(),
                             deltac.data_ptr<float>(), n_slices, dq_part, dk_h, dv_h, dmk_h, dmv_h);
  } else {
    const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
    const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct), doc = compute_view(dout, ct);
    if (tiles_f32) {
      backward_tiles<float>(P, f32, doc, qc, kc, vc, mkc, mvc, slopes.defined() ? slopes.data_ptr<float>() : nullptr,
                            lsec.data_ptr<float>(), deltac.data_ptr<float>(), n_slices, dq_part, dk_h, dv_h, dmk_h,
                            dmv_h);
    } else {
      AT_DISPATCH_FLOATING_TYPES(ct, "memory_attention_bwd_cpu", [&] {
        backward_kernel<scalar_t>(P, doc, qc, kc, vc, mkc, mvc,
                                  slopes.defined() ? slopes.data_ptr<scalar_t>() : nullptr, lsec, deltac, n_slices,
                                  dq_part, dk_h, dv_h, dmk_h, dmv_h);
      });
    }
  }
  // Per-query-head key gradients summed over each GQA group; dq and dk carry the logit scale.
  const auto fold = [&](const Tensor& g, double s) {
    Tensor r = P.group() == 1 ? g : g.view({P.B, P.Hkv, P.group(), g.size(2), g.size(3)}).sum(2);
    if (s != 1.0) r = r.mul_(s);
    return r.to(q.scalar_type());
  };
  Tensor dq = (n_slices == 1 ? dq_part[0] : dq_part.sum(0)).mul_(scale).to(q.scalar_type());
  return {dq, fold(dk_h, scale), fold(dv_h, 1.0), fold(dmk_h, scale), fold(dmv_h, 1.0)};
}

// Relative positions (docs/semantics.md §9): what the ops add to memory_attention's checks. Returns P.
int64_t check_relative(const char* op, const checks::MemoryAttentionDims& d, const Tensor& q, const Tensor& qv,
                       const Tensor& pos_emb, bool causal) {
  TORCH_CHECK(causal, op, ": relative positions need causal attention (distances are >= 0)");
  TORCH_CHECK(qv.defined() && qv.sizes() == q.sizes() && qv.scalar_type() == q.scalar_type() &&
                  qv.device() == q.device(),
              op, ": q_pos must have q's shape, dtype and device, got ", qv.sizes());
  TORCH_CHECK(pos_emb.defined() && pos_emb.dim() == 3 && pos_emb.size(0) == d.H && pos_emb.size(2) == d.D &&
                  pos_emb.scalar_type() == q.scalar_type() && pos_emb.device() == q.device(),
              op, ": pos_emb must be (H=", d.H, ", P, D=", d.D, ") of q's dtype and device, got ", pos_emb.sizes());
  const int64_t far = (d.window ? std::min<int64_t>(d.window, d.Q0 + d.N) : d.Q0 + d.N) - 1;
  TORCH_CHECK(pos_emb.size(1) >= far + 1, op, ": pos_emb must hold every visible distance 0 .. ", far,
              " (P >= ", far + 1, "), got P=", pos_emb.size(1));
  return pos_emb.size(1);
}

std::tuple<Tensor, Tensor> memory_attention_rel_fwd(const Tensor& q, const Tensor& qv, const Tensor& k,
                                                    const Tensor& v, const Tensor& mem_k, const Tensor& mem_v,
                                                    const Tensor& pos_emb, bool causal, int64_t window, double scale) {
  const char* op = "memory_attention_rel_fwd";
  const auto dims = checks::memory_attention(op, q, k, v, mem_k, mem_v, std::nullopt, window);
  const int64_t Pn = check_relative(op, dims, q, qv, pos_emb, causal);
  MaskBuffers buffers;
  const Problem P = describe(q, k, v, mem_k, dims.Q0, causal, dims.window, scale, std::nullopt, std::nullopt, 0.0,
                             buffers);
  const auto ct = compute_type(q.scalar_type());
  Tensor out = at::empty({P.B, P.H, P.N, P.Dv}, q.options().dtype(ct));
  Tensor lse = at::empty({P.B, P.H, P.N}, q.options().dtype(ct));
  const F32Tiles f32 = f32_tiles();
  // Decoding (few rows per kv head): the decode path with the position term read from pos_emb's rows in place;
  // bfloat16 widened as its rows are read (per-row position products leave no pairs for the BF16 kernels).
  const DecodeKind decode = P.group() * P.N <= kRelDecodeRows ? decode_kind(P, q.scalar_type(), f32) : DecodeKind::None;
  if (decode == DecodeKind::Loops) {
    decode_forward<double, double, DecodeKind::Loops>(P, f32, q, k, v, mem_k, mem_v, nullptr, nullptr, out, lse, &qv,
                                                      &pos_emb);
    return {out, lse};
  }
  if (decode != DecodeKind::None) {
    if (q.scalar_type() == at::kFloat) {
      decode_forward<float, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, nullptr, nullptr, out, lse, &qv,
                                                    &pos_emb);
    } else if (q.scalar_type() == at::kBFloat16) {
      decode_forward<at::BFloat16, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, nullptr, nullptr, out, lse,
                                                           &qv, &pos_emb);
    } else {
      decode_forward<at::Half, float, DecodeKind::F32>(P, f32, q, k, v, mem_k, mem_v, nullptr, nullptr, out, lse, &qv,
                                                       &pos_emb);
    }
    return {out.to(q.scalar_type()), lse};
  }
  // bfloat16's content products on its micro-kernels (AVX-512 BF16); the position products through the BLAS, in
  // the compute type.
  const Tensor qvc = compute_view(qv, ct), posc = compute_view(pos_emb, ct);
  const Tiles tiles_kind = forward_tiles(q, f32);
  if (tiles_kind == Tiles::Bf16) {
    const PackedProducts<uint16_t>::Shared shared(P, F32Tiles::None, q, k, v, mem_k, mem_v);
    const PackedRel<uint16_t> rel(qv, pos_emb, Pn, F32Tiles::None);
    forward_kernel<float, PackedProducts<uint16_t>, PackedRel<uint16_t>>(P, shared, nullptr, nullptr, out, lse, &rel);
    return {out.to(q.scalar_type()), lse};
  }
  if (tiles_kind == Tiles::F32) {  // float32 (bf16/fp16 widened where the CPU has no AVX-512 BF16)
    const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
    const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct);
    const PackedProducts<float>::Shared shared(P, f32, qc, kc, vc, mkc, mvc);
    const PackedRel<float> rel(qvc, posc, Pn, f32);
    forward_kernel<float, PackedProducts<float>, PackedRel<float>>(P, shared, nullptr, nullptr, out, lse, &rel);
    return {out.to(q.scalar_type()), lse};
  }
  const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
  const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "memory_attention_rel_fwd_cpu", [&] {
    const typename BlasProducts<scalar_t>::Shared shared{qc, kc, vc, mkc, mvc};
    const RelPositions<scalar_t> rel{&qvc, &posc, Pn};
    forward_kernel<scalar_t, BlasProducts<scalar_t>>(P, shared, nullptr, nullptr, out, lse, &rel);
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> memory_attention_rel_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& qv, const Tensor& k, const Tensor& v, const Tensor& mem_k,
    const Tensor& mem_v, const Tensor& pos_emb, const Tensor& lse, const Tensor& delta, bool causal, int64_t window,
    double scale) {
  const char* op = "memory_attention_rel_bwd";
  const auto dims = checks::memory_attention(op, q, k, v, mem_k, mem_v, std::nullopt, window);
  checks::memory_attention_grads(op, dims, q, dout, lse, delta);
  const int64_t Pn = check_relative(op, dims, q, qv, pos_emb, causal);
  MaskBuffers buffers;
  const Problem P = describe(q, k, v, mem_k, dims.Q0, causal, dims.window, scale, std::nullopt, std::nullopt, 0.0,
                             buffers);
  const auto ct = compute_type(q.scalar_type());
  const Tensor lsec = compute_view(lse, ct).contiguous(), deltac = compute_view(delta, ct).contiguous();
  // The micro-kernels where the CPU has them, as memory_attention_bwd chooses; the BLAS tiles otherwise.
  const F32Tiles f32 = f32_tiles();
  const bool bf16 = q.scalar_type() == at::kBFloat16 && has_avx512_bf16() && f32 != F32Tiles::None;
  const bool tiles_f32 = !bf16 && ct == at::kFloat && f32 != F32Tiles::None;
  const int64_t threads = at::get_num_threads(), bh = P.B * P.H, tile_k = (bf16 || tiles_f32) ? kBwdK : kBlockK;
  const int64_t n_kt = (P.M + tile_k - 1) / tile_k + (P.N + tile_k - 1) / tile_k;
  int64_t n_slices = 1;
  if (bh % threads != 0 && bh < 4 * threads) n_slices = std::min(n_kt, (2 * threads + bh - 1) / bh);
  const auto copts = q.options().dtype(ct);
  Tensor dq_part = at::zeros({n_slices, P.B, P.H, P.N, P.D}, copts);
  Tensor dqv_part = at::zeros({n_slices, P.B, P.H, P.N, P.D}, copts);
  Tensor dpos_part = at::zeros({n_slices, P.B, P.H, Pn, P.D}, copts);
  Tensor dk_h = at::zeros({P.B, P.H, P.N, P.D}, copts), dv_h = at::zeros({P.B, P.H, P.N, P.Dv}, copts);
  Tensor dmk_h = at::zeros({P.B, P.H, P.M, P.D}, copts), dmv_h = at::zeros({P.B, P.H, P.M, P.Dv}, copts);
  const float* lse_f = ct == at::kFloat ? lsec.data_ptr<float>() : nullptr;
  const float* delta_f = ct == at::kFloat ? deltac.data_ptr<float>() : nullptr;
  if (bf16) {
    const PackedRel<uint16_t> rel(qv, pos_emb, Pn, f32, /*backward=*/true);
    backward_tiles<uint16_t>(P, f32, dout.to(at::kBFloat16), q, k, v, mem_k, mem_v, nullptr, lse_f, delta_f,
                             n_slices, dq_part, dk_h, dv_h, dmk_h, dmv_h, &rel, &dqv_part, &dpos_part);
  } else {
    const Tensor qc = compute_view(q, ct), kc = compute_view(k, ct), vc = compute_view(v, ct);
    const Tensor mkc = compute_view(mem_k, ct), mvc = compute_view(mem_v, ct), doc = compute_view(dout, ct);
    const Tensor qvc = compute_view(qv, ct), posc = compute_view(pos_emb, ct);
    if (tiles_f32) {
      const PackedRel<float> rel(qvc, posc, Pn, f32, /*backward=*/true);
      backward_tiles<float>(P, f32, doc, qc, kc, vc, mkc, mvc, nullptr, lse_f, delta_f, n_slices, dq_part, dk_h,
                            dv_h, dmk_h, dmv_h, &rel, &dqv_part, &dpos_part);
    } else {
      AT_DISPATCH_FLOATING_TYPES(ct, "memory_attention_rel_bwd_cpu", [&] {
        const RelPositions<scalar_t> rel{&qvc, &posc, Pn};
        backward_kernel<scalar_t>(P, doc, qc, kc, vc, mkc, mvc, nullptr, lsec, deltac, n_slices, dq_part, dk_h,
                                  dv_h, dmk_h, dmv_h, &rel, &dqv_part, &dpos_part);
      });
    }
  }
  const auto fold = [&](const Tensor& g, double s) {
    Tensor r = P.group() == 1 ? g : g.view({P.B, P.Hkv, P.group(), g.size(2), g.size(3)}).sum(2);
    if (s != 1.0) r = r.mul_(s);
    return r.to(q.scalar_type());
  };
  Tensor dq = dq_part.sum(0).mul_(scale).to(q.scalar_type());
  Tensor dqv = dqv_part.sum(0).mul_(scale).to(q.scalar_type());
  Tensor dpos = dpos_part.sum({0, 1}).mul_(scale).to(pos_emb.scalar_type());
  return {dq, dqv, fold(dk_h, scale), fold(dv_h, 1.0), fold(dmk_h, scale), fold(dmv_h, 1.0), dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(longkernels, CPU, m) {
  m.impl("memory_attention_fwd", &memory_attention_fwd);
  m.impl("memory_attention_bwd", &memory_attention_bwd);
  m.impl("memory_attention_rel_fwd", &memory_attention_rel_fwd);
  m.impl("memory_attention_rel_bwd", &memory_attention_rel_bwd);
}

}  // namespace longkernels::cpu
