// LSH attention on the CPU: hash and sort, forward and backward (docs/semantics.md §2).
//
// Hash and sort. Work item (b, h): the float32 projections x R of a block of rows come from the BLAS
// (at::mm, as the reference's matmul does, so both see the same float32 products), the argmax over
// [xR ; -xR] is taken on the fly, and each round's items are then ordered by a counting sort over
// the n_buckets (+1 for padding) buckets: O(L) instead of argsort's O(L log L), and stable by
// construction (positions are scattered in increasing order), which is the unique-key order.
//
// Attention. The sorted sequence (n_hashes * Lp items) is cut into T chunks of C; a query chunk
// attends to W = (before + 1 + after) * C keys: its own chunk and its neighbours, circularly. Per
// chunk, the window's rows are gathered from qk and v by position (the keys normalised on the way)
// into packed panels, so there is never a sorted copy of qk or v: S = Q K^T and O = P V run on
// those panels through our micro-kernels (tile_gemm.h: AVX-512 or AVX2 + FMA) in float, or a plain loop
// in double and on CPUs with neither. Chunks are independent in the forward, so threads split them.
// Rounds land in per-round buffers at original positions and are combined at the end.
//
// Backward, per chunk: recompute S and dP = dO V^T, P from the saved statistics, dS = P (dP - delta)
// (zero on the self entry, whose logit is a constant), then dV += P^T dO, dK += dS^T Q, dQ = dS K.
// dK and dV of a window belong to neighbouring chunks, so the chunks of a head are cut into an even
// number of segments of at least (before + after) chunks, and even and odd segments run in two
// phases: two segments running at once never touch the same key chunk, no atomics, no per-thread
// copies, and the sums are deterministic. Gradients accumulate in sorted order and are gathered back
// to positions (summing the rounds) at the end.
//
// Masks by original position: padded keys (key_padding_mask, or past L) and, if causal, later keys
// are excluded (-1e9 in the semantics; exp underflows to exactly 0 since every row holds its self
// entry at -1e5 or more); the self entry is the constant -1e5. The row statistics are kept as a max
// M and log(sum), never added: a row that sees only itself has M = -1e5, where float32 has a
// spacing of 0.008 and M + log(sum) would lose the weight's first three digits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/op_checks.h"
#include "cpu/cpu_features.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec_math.h"

namespace longkernels::cpu {
namespace {

using at::Tensor;

constexpr double kSelfMask = -1e5;
constexpr double kNormEps = 1e-6;

inline int64_t round_up16(int64_t x) { return (x + 15) / 16 * 16; }

// ---------------------------------------------------------------------------------------------
// Hash and sort.
// ---------------------------------------------------------------------------------------------
// argmax over [y ; -y], first index on ties: the first half wins a tie between halves, and within a
// half the first position holding the extreme wins. Three vector reductions instead of 2K
// compare-and-branch steps. A NaN counts as the largest value, as in torch.argmax (the reference's
// rule): the first NaN of y wins (-NaN is NaN at the same position of the second half, later), so a
// token with a NaN projection lands in the bucket the reference gives it and moves no other token.
template <typename T>
__attribute__((always_inline)) inline int32_t argmax_pm_impl(const T* __restrict y, int64_t K) {
  int32_t first_nan = static_cast<int32_t>(K);
#pragma omp simd reduction(min : first_nan)
  for (int32_t j = 0; j < static_cast<int32_t>(K); ++j) first_nan = std::min(first_nan, y[j] != y[j] ? j : first_nan);
  if (first_nan < K) return first_nan;
  T hi = y[0], lo = y[0];
#pragma omp simd reduction(max : hi) reduction(min : lo)
  for (int64_t k = 0; k < K; ++k) {
    hi = y[k] > hi ? y[k] : hi;
    lo = y[k] < lo ? y[k] : lo;
  }
  const bool first_half = hi >= -lo;
  const T want = first_half ? hi : lo;
  int32_t k = static_cast<int32_t>(K - 1);  // the first position holding it: a vector min over indices
#pragma omp simd reduction(min : k)
  for (int32_t j = 0; j < static_cast<int32_t>(K); ++j) k = std::min(k, y[j] == want ? j : k);
  return static_cast<int32_t>(first_half ? k : K + k);
}
LK_CLONES int32_t argmax_pm(const float* y, int64_t K) { return argmax_pm_impl(y, K); }

std::tuple<Tensor, Tensor> lsh_hash_sort(const Tensor& qk, const Tensor& rotations,
                                         const std::optional<Tensor>& key_padding_mask, int64_t n_buckets,
                                         int64_t padded_len, at::OptionalIntArrayRef bucket_factors) {
  checks::lsh_hash_sort("lsh_hash_sort", qk, rotations, key_padding_mask, n_buckets, padded_len, bucket_factors);
  const int64_t B = qk.size(0), H = qk.size(1), L = qk.size(2), D = qk.size(3);
  const int64_t nh = rotations.size(2), K = rotations.size(3), Lp = padded_len;
  // Factorised hashing: round r's K columns are the factors' blocks of f / 2; bucket = b1 + f1 * (b2 + f2 * ...).
  std::vector<int64_t> factors;
  if (bucket_factors.has_value()) factors.assign(bucket_factors->begin(), bucket_factors->end());
  if (factors.empty()) factors.push_back(n_buckets);
  const Tensor x = qk.detach().to(at::kFloat);
  const Tensor rot = rotations.detach().to(at::kFloat).contiguous().view({H, D, nh * K});
  Tensor kpm;
  if (key_padding_mask.has_value()) kpm = key_padding_mask->to(at::kBool).contiguous();
  const bool* pad = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  Tensor buckets = at::empty({B, H, nh, Lp}, qk.options().dtype(at::kInt));
  Tensor perm = at::empty({B, H, nh, Lp}, qk.options().dtype(at::kInt));
  int32_t* bk_d = buckets.data_ptr<int32_t>();
  int32_t* perm_d = perm.data_ptr<int32_t>();
  constexpr int64_t kRows = 256;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Tensor Y = at::empty({kRows, nh * K}, x.options());
    std::vector<int64_t> next(n_buckets + 1);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      int32_t* bk = bk_d + bh * nh * Lp;
      for (int64_t i0 = 0; i0 < L; i0 += kRows) {
        const int64_t rows = std::min(kRows, L - i0);
        Tensor Yt = Y.narrow(0, 0, rows);
        at::mm_out(Yt, x[b][h].narrow(0, i0, rows), rot[h]);
        const float* y_d = Y.data_ptr<float>();
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t r = 0; r < nh; ++r) {
            const float* y = y_d + i * nh * K + r * K;
            int64_t bucket = 0, weight = 1;
            for (const int64_t f : factors) {
              bucket += weight * argmax_pm(y, f / 2);
              weight *= f;
              y += f / 2;
            }
            bk[r * Lp + i0 + i] = static_cast<int32_t>(bucket);
          }
        }
      }
      for (int64_t r = 0; r < nh; ++r) {
        int32_t* br = bk + r * Lp;
        for (int64_t p = 0; p < Lp; ++p)
          if (p >= L || (pad && pad[b * L + p])) br[p] = static_cast<int32_t>(n_buckets);
        // Counting sort: histogram, exclusive scan, scatter in position order (stable).
        std::fill(next.begin(), next.end(), 0);
        for (int64_t p = 0; p < Lp; ++p) ++next[br[p]];
        int64_t run = 0;
        for (auto& c : next) {
          const int64_t n = c;
          c = run;
          run += n;
        }
        int32_t* out = perm_d + (bh * nh + r) * Lp;
        for (int64_t p = 0; p < Lp; ++p) out[next[br[p]]++] = static_cast<int32_t>(p);
      }
    }
  });
  return {buckets, perm};
}

// ---------------------------------------------------------------------------------------------
// Attention: shared description, gathers and products.
// ---------------------------------------------------------------------------------------------
struct Problem {
  int64_t B, H, L, D, Dv, nh, Lp, C, T, before, after, nw;
  bool causal;
  double scale;
  int64_t Dp, Dvp;  // head dims padded to 16 columns for the micro-kernels
};

Problem describe(const Tensor& qk, const Tensor& v, const Tensor& perm, int64_t C, int64_t before, int64_t after,
                 bool causal, double scale) {
  Problem P{};
  P.B = qk.size(0), P.H = qk.size(1), P.L = qk.size(2), P.D = qk.size(3), P.Dv = v.size(3);
  P.nh = perm.size(2), P.Lp = perm.size(3), P.C = C, P.T = P.nh * P.Lp / C;
  P.before = before, P.after = after, P.nw = before + 1 + after;
  P.causal = causal, P.scale = scale;
  P.Dp = round_up16(P.D), P.Dvp = round_up16(P.Dv);
  return P;
}

template <typename T>
struct Rows {  // strided (B, H, L, d) tensor in the compute type
  const T* p;
  int64_t s0, s1, s2, s3;
  explicit Rows(const Tensor& t)
      : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t h, int64_t i) const { return p + b * s0 + h * s1 + i * s2; }
};

// C[M x N] (=|+=) A[M x K] B[K x N]; A row-major (lda) or, with `at`, stored transposed
// (element (m, t) at A[t * lda + m]); B row-major (ldb). With `fast` (float, tile kernels) N must
// be a multiple of 16 (the micro-kernels' contract; callers zero-pad).
template <typename T>
__attribute__((always_inline)) inline void gemm_loop_impl(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                                                          bool at, const T* Bm, int64_t ldb, T* Cm, int64_t ldc,
                                                          bool acc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = Cm + i * ldc;
    if (!acc) std::fill(c, c + N, T(0));
    for (int64_t t = 0; t < K; ++t) {
      const T a = at ? A[t * lda + i] : A[i * lda + t];
      const T* bt = Bm + t * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += a * bt[n];
    }
  }
}
void gemm_loop(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, bool at, const double* Bm,
               int64_t ldb, double* Cm, int64_t ldc, bool acc) {
  gemm_loop_impl(M, N, K, A, lda, at, Bm, ldb, Cm, ldc, acc);
}
LK_CLONES void gemm_loop(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, bool at, const float* Bm,
                         int64_t ldb, float* Cm, int64_t ldc, bool acc) {
  gemm_loop_impl(M, N, K, A, lda, at, Bm, ldb, Cm, ldc, acc);
}
template <typename T>
void gemm(F32Tiles fast, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bm, int64_t ldb, T* Cm,
          int64_t ldc, bool acc, bool at = false) {
  if constexpr (std::is_same_v<T, float>) {
    if (fast != F32Tiles::None) {
      if (at) return tile::gemm_f32_at(fast, M, N, K, A, lda, Bm, ldb, Cm, ldc, acc);
      return tile::gemm_f32(fast, M, N, K, A, lda, Bm, ldb, Cm, ldc, acc);
    }
  }
  gemm_loop(M, N, K, A, lda, at, Bm, ldb, Cm, ldc, acc);
}

template <typename T>
struct Inputs {
  Rows<T> qk, v;
  const int32_t* perm;  // (B, H, nh * Lp) in sorted order
  const bool* pad;      // (B, L) or null
};

// One chunk of the sorted sequence as the key side needs it: positions, padding flags, normalised
// keys and values, in the layouts of the tile products; Cp = C rounded up to 16, padding
// columns/rows zero and flagged as padding. Built once per chunk and reused by the consecutive
// windows that contain it (a thread walks consecutive query chunks).
template <typename T>
struct KeyChunk {
  int64_t tag = INT64_MIN;    // unwrapped chunk index it holds
  std::vector<int32_t> pk;    // Cp
  std::vector<int32_t> kpad;  // Cp: 1 = padding (int32 like pk, so the row loops vectorise)
  std::vector<T> kt;          // D x Cp: keys transposed (S = Q K^T)
  std::vector<T> krows;       // Cp x Dp: keys (dQ = dS K; backward only)
  std::vector<T> vrows;       // Cp x Dvp: values (O = P V; forward only)
  std::vector<T> vt;          // Dv x Cp: values transposed (dP = dO V^T; backward only)
};

template <typename T>
struct Scratch {
  const Problem& P;
  bool backward;
  int64_t Cp, Wp;  // chunk and window widths in columns
  std::vector<KeyChunk<T>> ring;  // the window's chunks, slot = unwrapped index mod nw
  std::vector<int32_t> pk;        // Wp: the window's key positions
  std::vector<int32_t> kpad;      // Wp
  std::vector<T> rows;            // Cp x D: gathered key rows before normalising/transposing
  std::vector<T> q, s, dp, o, dout;
  Scratch(const Problem& P_, bool backward_)
      : P(P_), backward(backward_), Cp(round_up16(P_.C)), Wp(P_.nw * round_up16(P_.C)), ring(P_.nw),
        pk(Wp), kpad(Wp), rows(Cp * P_.D), q(P_.C * P_.Dp, T(0)), s(P_.C * Wp, T(0)) {
    for (auto& k : ring) {
      k.pk.assign(Cp, -1);
      k.kpad.assign(Cp, 1);
      k.kt.assign(P.D * Cp, T(0));
      if (backward) {
        k.krows.assign(Cp * P.Dp, T(0));
        k.vt.assign(P.Dv * Cp, T(0));
      } else {
        k.vrows.assign(Cp * P.Dvp, T(0));
      }
    }
    if (backward) {
      dp.assign(P.C * Wp, T(0));
      dout.assign(P.C * P.Dvp, T(0));
    } else {
      o.assign(P.C * P.Dvp, T(0));
    }
  }
  // The chunk at unwrapped window index u (sorted chunk u mod T), loaded if not cached.
  KeyChunk<T>& chunk(const Inputs<T>& in, int64_t b, int64_t h, int64_t u) {
    KeyChunk<T>& k = ring[((u % P.nw) + P.nw) % P.nw];
    if (k.tag != u) {
      load(in, b, h, ((u % P.T) + P.T) % P.T, k);
      k.tag = u;
    }
    return k;
  }
  void load(const Inputs<T>& in, int64_t b, int64_t h, int64_t c, KeyChunk<T>& k) {
    const int32_t* perm = in.perm + (b * P.H + h) * P.nh * P.Lp + c * P.C;
    const T inv_sqrt_d = T(1) / std::sqrt(static_cast<T>(P.D));
    const int64_t D = P.D, Dv = P.Dv;
    for (int64_t i = 0; i < P.C; ++i) {
      const int32_t pos = perm[i];
      k.pk[i] = pos;
      const bool beyond = pos >= P.L;
      k.kpad[i] = beyond || (in.pad && in.pad[b * P.L + pos]);
      T* x = rows.data() + i * D;
      if (beyond) {  // internal padding: zero key and value (never weighted)
        std::fill(x, x + D, T(0));
        if (backward) {
          for (int64_t d = 0; d < Dv; ++d) k.vt[d * Cp + i] = T(0);
        } else {
          std::fill(&k.vrows[i * P.Dvp], &k.vrows[i * P.Dvp] + Dv, T(0));
        }
        continue;
      }
      copy_row(in.qk.row(b, h, pos), in.qk.s3, D, x);
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
      const T norm = inv_sqrt_d / std::sqrt(ss / static_cast<T>(D) + static_cast<T>(kNormEps));
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) x[d] *= norm;
      if (backward) {
        copy_row(x, 1, D, &k.krows[i * P.Dp]);
        const T* vr = in.v.row(b, h, pos);
        for (int64_t d = 0; d < Dv; ++d) k.vt[d * Cp + i] = vr[d * in.v.s3];
      } else {
        copy_row(in.v.row(b, h, pos), in.v.s3, Dv, &k.vrows[i * P.Dvp]);
      }
    }
    // Keys transposed, by blocks of 16 rows (reads stay within a few cache lines).
    for (int64_t i0 = 0; i0 < P.C; i0 += 16) {
      const int64_t i1 = std::min(P.C, i0 + 16);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t i = i0; i < i1; ++i) k.kt[d * Cp + i] = rows[i * D + d];
    }
  }
  static void copy_row(const T* src, int64_t stride, int64_t n, T* dst) {
    if (stride == 1) {  // a loop, not std::copy: rows are short and memmove's call cost showed
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
    } else {
      for (int64_t d = 0; d < n; ++d) dst[d] = src[d * stride];
    }
  }
  // Loads chunk c's window (ring slots in window order) and its key positions/flags.
  void window(const Inputs<T>& in, int64_t b, int64_t h, int64_t c, KeyChunk<T>** chunks) {
    for (int64_t j = 0; j < P.nw; ++j) {
      chunks[j] = &chunk(in, b, h, c + j - P.before);
      std::copy(chunks[j]->pk.begin(), chunks[j]->pk.end(), pk.begin() + j * Cp);
      std::copy(chunks[j]->kpad.begin(), chunks[j]->kpad.end(), kpad.begin() + j * Cp);
    }
  }
};

// Prefetches rows [i0, i1) of sorted chunk c (wrapped), which a later step gathers: the rows sit at
// scattered positions, so without it every row is a cache miss paid in the gather. Callers spread a
// chunk's rows over the row loop of the chunk before (a row per step): a burst of a whole chunk
// (512 lines for keys and values) overflowed the core's outstanding-miss slots, and the prefetches
// beyond them were lost (perf on the AVX2 EPYC: the gathers still stalled).
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const Problem& P, const Rows<T>& src,
                                                         const int32_t* perm_bh, int64_t b, int64_t h, int64_t c,
                                                         int64_t i0, int64_t i1, int64_t d_len) {
  c = ((c % P.T) + P.T) % P.T;
  const int64_t span = ((d_len - 1) * src.s3 + 1) * static_cast<int64_t>(sizeof(T));
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t pos = perm_bh[c * P.C + i];
    if (pos >= P.L) continue;
    const uintptr_t first = reinterpret_cast<uintptr_t>(src.row(b, h, pos));
    for (uintptr_t line = first & ~uintptr_t(63); line < first + span; line += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(line));
  }
}

// Chunk c's query rows (qk at their positions; zero rows past L).
template <typename T>
void gather_rows(const Problem& P, const Rows<T>& src, const int32_t* perm_bh, int64_t b, int64_t h, int64_t c,
                 int64_t d_len, int64_t ld, T* dst) {
  for (int64_t i = 0; i < P.C; ++i) {
    const int32_t pos = perm_bh[c * P.C + i];
    T* out = dst + i * ld;
    if (pos >= P.L) {
      std::fill(out, out + d_len, T(0));
      continue;
    }
    Scratch<T>::copy_row(src.row(b, h, pos), src.s3, d_len, out);
  }
}

// Whether key column n is hidden from the query at position pq (padding, or later if causal) and
// whether it is the query's own entry; bitwise on int32 so that the row loops below vectorise
// (short-circuit && and || made them scalar, with a branch per element).
__attribute__((always_inline)) inline int32_t is_hidden(int32_t pk, int32_t kpad, int32_t pq, int32_t causal) {
  return static_cast<int32_t>(pk != pq) & (kpad | (causal & static_cast<int32_t>(pk > pq)));
}

// Forward row: raw q.k -> probabilities in place over the W window columns; returns max and sum.
// exp_avx2: the exponentials through tile::exp_sum_avx2 (float rows of a call on the AVX2 tiles).
template <typename T>
__attribute__((always_inline)) inline void fwd_row_impl(T* __restrict s, const int32_t* __restrict pk,
                                                        const int32_t* __restrict kpad, int64_t W, int32_t pq,
                                                        int32_t causal, T scale, T& m_out, T& l_out,
                                                        bool exp_avx2) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T mx = neg_inf;
#pragma omp simd reduction(max : mx)
  for (int64_t n = 0; n < W; ++n) {
    const T raw = s[n] * scale;
    const T x = pk[n] == pq ? static_cast<T>(kSelfMask) : raw;
    const T y = is_hidden(pk[n], kpad[n], pq, causal) ? neg_inf : x;
    s[n] = y;
    mx = mx > y ? mx : y;
  }
  m_out = mx;
  if constexpr (std::is_same_v<T, float>) {
    if (exp_avx2) {
      l_out = tile::exp_sum_avx2(s, W, mx);
      return;
    }
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t n = 0; n < W; ++n) {
    const T p = exp_approx(s[n] - mx);
    s[n] = p;
    sum += p;
  }
  l_out = sum;
}
LK_CLONES void fwd_row(float* s, const int32_t* pk, const int32_t* kpad, int64_t W, int32_t pq, int32_t causal,
                       float scale, float& m, float& l, bool exp_avx2) {
  fwd_row_impl<float>(s, pk, kpad, W, pq, causal, scale, m, l, exp_avx2);
}
void fwd_row(double* s, const int32_t* pk, const int32_t* kpad, int64_t W, int32_t pq, int32_t causal, double scale,
             double& m, double& l, bool) {
  fwd_row_impl<double>(s, pk, kpad, W, pq, causal, scale, m, l, false);
}

// Backward row: s (raw q.k) -> p = exp((logit - M) - log_sum); dp -> ds = p (dp - delta), zero on
// the self entry (a constant logit) and on hidden keys. exp_avx2: the exponentials and ds through
// tile::softmax_grad_avx2 (float rows of a call on the AVX2 tiles), on logits already less the row's max
// (hidden keys at -inf, so p = 0), with the exact zeros put back after it: the same values and bits.
template <typename T>
__attribute__((always_inline)) inline void bwd_row_impl(T* __restrict s, T* __restrict dp,
                                                        const int32_t* __restrict pk,
                                                        const int32_t* __restrict kpad, int64_t W, int32_t pq,
                                                        int32_t causal, T scale, T mx, T log_sum, T delta,
                                                        bool exp_avx2) {
  if constexpr (std::is_same_v<T, float>) {
    if (exp_avx2) {
      const T neg_inf = -std::numeric_limits<T>::infinity();
#pragma omp simd
      for (int64_t n = 0; n < W; ++n) {
        const T x = pk[n] == pq ? static_cast<T>(kSelfMask) : s[n] * scale;
        s[n] = is_hidden(pk[n], kpad[n], pq, causal) ? neg_inf : x - mx;
      }
      tile::softmax_grad_avx2(s, dp, W, 1.0f, 0.0f, 0, log_sum, delta);
#pragma omp simd
      for (int64_t n = 0; n < W; ++n) {
        const int32_t zero = static_cast<int32_t>(pk[n] == pq) | is_hidden(pk[n], kpad[n], pq, causal);
        dp[n] = zero ? T(0) : dp[n];
      }
      return;
    }
  }
#pragma omp simd
  for (int64_t n = 0; n < W; ++n) {
    const int32_t self = pk[n] == pq;
    const int32_t hidden = is_hidden(pk[n], kpad[n], pq, causal);
    const T x = self ? static_cast<T>(kSelfMask) : s[n] * scale;
    // Recomputed from the saved statistics, p can round a hair above 1 (huge logits); a probability
    // never exceeds 1, and the comparison keeps a NaN a NaN.
    const T e0 = exp_approx((x - mx) - log_sum);
    const T e = e0 > T(1) ? T(1) : e0;
    const T p = hidden ? T(0) : e;
    s[n] = p;
    dp[n] = (self | hidden) ? T(0) : p * (dp[n] - delta);
  }
}
LK_CLONES void bwd_row(float* s, float* dp, const int32_t* pk, const int32_t* kpad, int64_t W, int32_t pq,
                       int32_t causal, float scale, float mx, float log_sum, float delta, bool exp_avx2) {
  bwd_row_impl<float>(s, dp, pk, kpad, W, pq, causal, scale, mx, log_sum, delta, exp_avx2);
}
void bwd_row(double* s, double* dp, const int32_t* pk, const int32_t* kpad, int64_t W, int32_t pq, int32_t causal,
             double scale, double mx, double log_sum, double delta, bool) {
  bwd_row_impl<double>(s, dp, pk, kpad, W, pq, causal, scale, mx, log_sum, delta, false);
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
// Detached and in the compute type: for float/double inputs a view, so strides are read in place.
Tensor compute_view(const Tensor& t, at::ScalarType ct) { return t.detach().to(ct); }
// An uninitialised tensor shaped like `t`, in the compute type, with t's dimension order when that
// keeps the last dimension unit-stride (else contiguous): gradients and outputs come back in the
// layout their inputs had, so the transposes around a layer stay views.
Tensor like_rows(const Tensor& t, at::ScalarType ct) {
  Tensor r = at::empty_like(t, t.options().dtype(ct), at::MemoryFormat::Preserve);
  return r.stride(3) == 1 ? r : at::empty(t.sizes(), t.options().dtype(ct));
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_kernel(const Problem& P, const Inputs<T>& in, F32Tiles fast, const Rows<T>& out_rows, T* lse_max,
                    T* lse_log) {
  // Per-round results of one head at original positions: o (nh, L, Dv), max and sum (nh, L). With one round
  // there is nothing to combine: rows go straight to the output (the combine's weight would be exactly 1).
  const bool one_round = P.nh == 1;
  std::vector<T> o_r(one_round ? 0 : P.nh * P.L * P.Dv), m_r(P.nh * P.L), l_r(P.nh * P.L);
  const int64_t rounds_chunks = P.Lp / P.C;
  for (int64_t bh = 0; bh < P.B * P.H; ++bh) {
    const int64_t b = bh / P.H, h = bh % P.H;
    const int32_t* perm = in.perm + bh * P.nh * P.Lp;
    // Runs of consecutive chunks (a thread's ring of key chunks serves consecutive windows), several
    // per thread, claimed one at a time as in the backward.
    const int64_t n_runs = std::min<int64_t>(P.T, 8 * at::get_num_threads());
    std::atomic<int64_t> next_run{0};
    at::parallel_for(0, std::min<int64_t>(n_runs, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      Scratch<T> w(P, false);
      std::vector<KeyChunk<T>*> win(P.nw);
      const int64_t Wp = w.Wp, Cp = w.Cp;
      for (int64_t run; (run = next_run.fetch_add(1, std::memory_order_relaxed)) < n_runs;) {
        const int64_t begin = run * P.T / n_runs, end = (run + 1) * P.T / n_runs;
        for (int64_t c = begin; c < end; ++c) {
          const int64_t r = c / rounds_chunks;
          const bool ahead = c + 1 < end;  // prefetch the next chunk's new rows, spread over the row loop
          w.window(in, b, h, c, win.data());
          gather_rows(P, in.qk, perm, b, h, c, P.D, P.Dp, w.q.data());
          for (int64_t j = 0; j < P.nw; ++j)
            gemm(fast, P.C, Cp, P.D, w.q.data(), P.Dp, win[j]->kt.data(), Cp, w.s.data() + j * Cp, Wp, false);
          for (int64_t i = 0; i < P.C; ++i) {
            if (ahead) {
              prefetch_rows(P, in.qk, perm, b, h, c + 1 + P.after, i, i + 1, P.D);
              prefetch_rows(P, in.v, perm, b, h, c + 1 + P.after, i, i + 1, P.Dv);
              if (P.after > 0) prefetch_rows(P, in.qk, perm, b, h, c + 1, i, i + 1, P.D);
            }
            const int32_t pq = perm[c * P.C + i];
            T* srow = w.s.data() + i * Wp;
            if (pq >= P.L) {  // internal padding: no output
              std::fill(srow, srow + Wp, T(0));
              continue;
            }
            T m, l;
            fwd_row(srow, w.pk.data(), w.kpad.data(), Wp, pq, P.causal, static_cast<T>(P.scale), m, l,
                    fast == F32Tiles::Avx2);
            m_r[r * P.L + pq] = m;
            l_r[r * P.L + pq] = l;
          }
          for (int64_t j = 0; j < P.nw; ++j)
            gemm(fast, P.C, P.Dvp, P.C, w.s.data() + j * Cp, Wp, win[j]->vrows.data(), P.Dvp, w.o.data(), P.Dvp,
                 j > 0);
          for (int64_t i = 0; i < P.C; ++i) {
            const int32_t pq = perm[c * P.C + i];
            if (pq >= P.L) continue;
            const T inv = T(1) / l_r[r * P.L + pq];
            T* dst = one_round ? const_cast<T*>(out_rows.row(b, h, pq)) : o_r.data() + (r * P.L + pq) * P.Dv;
            const T* src = w.o.data() + i * P.Dvp;
#pragma omp simd
            for (int64_t d = 0; d < P.Dv; ++d) dst[d] = src[d] * inv;
          }
        }
      }
    });
    if (one_round) {
      for (int64_t i = 0; i < P.L; ++i) {
        lse_max[bh * P.L + i] = m_r[i];
        lse_log[bh * P.L + i] = std::log(l_r[i]);
      }
      continue;
    }
    // Combine the rounds: weights exp(m_r - M) l_r, normalised.
    at::parallel_for(0, P.L, 256, [&](int64_t begin, int64_t end) {
      std::vector<T> wts(P.nh);
      for (int64_t i = begin; i < end; ++i) {
        T M = -std::numeric_limits<T>::infinity();
        for (int64_t r = 0; r < P.nh; ++r) M = std::max(M, m_r[r * P.L + i]);
        T den = 0;
        for (int64_t r = 0; r < P.nh; ++r) den += wts[r] = std::exp(m_r[r * P.L + i] - M) * l_r[r * P.L + i];
        T* dst = const_cast<T*>(out_rows.row(b, h, i));  // unit stride along Dv (v's layout)
        std::fill(dst, dst + P.Dv, T(0));
        for (int64_t r = 0; r < P.nh; ++r) {
          const T a = wts[r] / den;
          const T* src = o_r.data() + (r * P.L + i) * P.Dv;
          for (int64_t d = 0; d < P.Dv; ++d) dst[d] += a * src[d];
        }
        lse_max[bh * P.L + i] = M;
        lse_log[bh * P.L + i] = std::log(den);
      }
    });
  }
}

// Float products through our micro-kernels (AVX-512 or AVX2 + FMA) where the CPU has them, else
// plain loops (always for double). LONGKERNELS_CPU_TILES (cpu_features.h) forces the plain loops
// ("blas", memory attention's name for its portable path) or the AVX2 kernels ("avx2"): tests use
// it to cover every path on one machine.
F32Tiles use_fast_tiles(at::ScalarType ct) { return ct == at::kFloat ? f32_tiles() : F32Tiles::None; }

// Every round of perm must be a permutation of [0, Lp): the kernels index rows by its entries and the
// backward inverts it. O(B H n_hashes Lp), a bitmap per round: small beside the attention itself.
void check_permutation(const char* op, const Tensor& perm) {
  const int64_t rows = perm.size(0) * perm.size(1) * perm.size(2), Lp = perm.size(3);
  const Tensor p = perm.contiguous();
  const int32_t* d = p.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> seen(Lp);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(seen.begin(), seen.end(), uint8_t(0));
      const int32_t* row = d + r * Lp;
      bool ok = true;
      for (int64_t i = 0; i < Lp; ++i) {
        const int32_t x = row[i];
        const bool in = x >= 0 && x < Lp;
        ok &= in && !seen[in ? x : 0];
        if (in) seen[x] = 1;
      }
      TORCH_CHECK(ok, op, ": perm must hold a permutation of [0, ", Lp, ") in every round (entry out of range or "
                  "repeated in round ", r % perm.size(2), " of batch ", r / (perm.size(1) * perm.size(2)), ", head ",
                  r / perm.size(2) % perm.size(1), ")");
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> lsh_attention_fwd(const Tensor& qk, const Tensor& v, const Tensor& perm,
                                                     const std::optional<Tensor>& key_padding_mask,
                                                     int64_t chunk_size, int64_t n_chunks_before,
                                                     int64_t n_chunks_after, bool causal, double scale) {
  checks::lsh_attention("lsh_attention_fwd", qk, v, perm, key_padding_mask, chunk_size, n_chunks_before,
                        n_chunks_after);
  check_permutation("lsh_attention_fwd", perm);
  const Problem P = describe(qk, v, perm, chunk_size, n_chunks_before, n_chunks_after, causal, scale);
  const auto ct = compute_type(v.scalar_type());
  const Tensor qkc = compute_view(qk, ct), vc = compute_view(v, ct);
  const Tensor permc = perm.to(at::kInt).contiguous();
  Tensor kpm;
  if (key_padding_mask.has_value()) kpm = key_padding_mask->to(at::kBool).contiguous();
  // In v's memory layout: with v a (B, L, H, Dv) buffer seen as (B, H, L, Dv), a layer's
  // out.transpose(1, 2).reshape(B, L, H * Dv) is then a view, not a copy.
  Tensor out = like_rows(v, ct);
  Tensor lse_max = at::empty({P.B, P.H, P.L}, v.options().dtype(ct));
  Tensor lse_log = at::empty({P.B, P.H, P.L}, v.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "lsh_attention_fwd_cpu", [&] {
    const Inputs<scalar_t> in{Rows<scalar_t>(qkc), Rows<scalar_t>(vc), permc.data_ptr<int32_t>(),
                              kpm.defined() ? kpm.data_ptr<bool>() : nullptr};
    forward_kernel<scalar_t>(P, in, use_fast_tiles(ct), Rows<scalar_t>(out), lse_max.data_ptr<scalar_t>(),
                             lse_log.data_ptr<scalar_t>());
  });
  return {out.to(v.scalar_type()), lse_max, lse_log};
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------
// Even count of segments of >= (before + after) chunks each (so same-parity segments never share a
// key chunk), several per thread, which threads claim one at a time (a thread slowed down, by the
// machine or by its chunks, leaves its later segments to the others instead of holding everyone at
// the barrier); 1 when the head is too short to split.
int64_t segment_count(const Problem& P) {
  const int64_t reach = std::max<int64_t>(1, P.before + P.after);
  int64_t n = std::min<int64_t>(8 * at::get_num_threads(), P.T / reach);
  n -= n % 2;
  return n >= 2 ? n : 1;
}

template <typename T>
void backward_kernel(const Problem& P, const Inputs<T>& in, const Rows<T>& dout, const T* lse_max, const T* lse_log,
                     const T* delta, F32Tiles fast, const Rows<T>& dqk, const Rows<T>& dv) {
  const int64_t S = P.nh * P.Lp;  // sorted items per head
  // Sorted-order accumulators of one head, and each (round, position)'s sorted slot. dk_s and dv_s
  // start at zero; the pass back to positions zeroes every slot it reads, and padding slots are
  // zeroed after it, so each head starts from zero without a serial memset of both per head.
  std::vector<T> dq_s(S * P.Dp), dk_s(S * P.Dp), dv_s(S * P.Dvp);
  std::vector<int32_t> slot(S);
  const int64_t n_seg = segment_count(P);
  for (int64_t bh = 0; bh < P.B * P.H; ++bh) {
    const int64_t b = bh / P.H, h = bh % P.H;
    const int32_t* perm = in.perm + bh * S;
    const T* lm = lse_max + bh * P.L;
    const T* ll = lse_log + bh * P.L;
    const T* dl = delta + bh * P.L;
    for (int64_t phase = 0; phase < std::min<int64_t>(2, n_seg); ++phase) {
      const int64_t n_items = n_seg == 1 ? 1 : n_seg / 2;
      std::atomic<int64_t> next_item{0};
      at::parallel_for(0, std::min<int64_t>(n_items, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        Scratch<T> w(P, true);
        std::vector<KeyChunk<T>*> win(P.nw);
        const int64_t Wp = w.Wp, Cp = w.Cp;
        for (int64_t item; (item = next_item.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
          const int64_t seg = n_seg == 1 ? 0 : 2 * item + phase;
          const int64_t c_begin = seg * P.T / n_seg, c_end = (seg + 1) * P.T / n_seg;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const bool ahead = c + 1 < c_end;  // as in the forward
            w.window(in, b, h, c, win.data());
            gather_rows(P, in.qk, perm, b, h, c, P.D, P.Dp, w.q.data());
            gather_rows(P, dout, perm, b, h, c, P.Dv, P.Dvp, w.dout.data());
            for (int64_t j = 0; j < P.nw; ++j) {
              gemm(fast, P.C, Cp, P.D, w.q.data(), P.Dp, win[j]->kt.data(), Cp, w.s.data() + j * Cp, Wp, false);
              gemm(fast, P.C, Cp, P.Dv, w.dout.data(), P.Dvp, win[j]->vt.data(), Cp, w.dp.data() + j * Cp, Wp,
                   false);
            }
            for (int64_t i = 0; i < P.C; ++i) {
              if (ahead) {
                prefetch_rows(P, in.qk, perm, b, h, c + 1 + P.after, i, i + 1, P.D);
                prefetch_rows(P, in.v, perm, b, h, c + 1 + P.after, i, i + 1, P.Dv);
                prefetch_rows(P, dout, perm, b, h, c + 1, i, i + 1, P.Dv);
                if (P.after > 0) prefetch_rows(P, in.qk, perm, b, h, c + 1, i, i + 1, P.D);
              }
              const int32_t pq = perm[c * P.C + i];
              T* srow = w.s.data() + i * Wp;
              T* dprow = w.dp.data() + i * Wp;
              if (pq >= P.L) {
                std::fill(srow, srow + Wp, T(0));
                std::fill(dprow, dprow + Wp, T(0));
              } else {
                bwd_row(srow, dprow, w.pk.data(), w.kpad.data(), Wp, pq, P.causal, static_cast<T>(P.scale), lm[pq],
                        ll[pq], dl[pq], fast == F32Tiles::Avx2);
              }
            }
            for (int64_t j = 0; j < P.nw; ++j) {
              const int64_t cj = ((c + j - P.before) % P.T + P.T) % P.T;
              // dQ = dS K over the window (this chunk's slots, written once).
              gemm(fast, P.C, P.Dp, P.C, w.dp.data() + j * Cp, Wp, win[j]->krows.data(), P.Dp,
                   dq_s.data() + c * P.C * P.Dp, P.Dp, j > 0);
              // dV += P^T dO and dK += dS^T Q into the key chunk's slots (P, dS read transposed).
              gemm(fast, P.C, P.Dvp, P.C, w.s.data() + j * Cp, Wp, w.dout.data(), P.Dvp,
                   dv_s.data() + cj * P.C * P.Dvp, P.Dvp, true, true);
              gemm(fast, P.C, P.Dp, P.C, w.dp.data() + j * Cp, Wp, w.q.data(), P.Dp, dk_s.data() + cj * P.C * P.Dp,
                   P.Dp, true, true);
            }
          }
        }
      });
    }
    // Back to positions, summing the rounds; dk goes through the key normalisation
    // k = x n, n = rsqrt(mean(x^2) + eps) / sqrt(D):  dx += n (dk - x <x, dk> / (D (mean(x^2) + eps))).
    for (int64_t s = 0; s < S; ++s) {
      slot[(s / P.Lp) * P.Lp + perm[s]] = static_cast<int32_t>(s);
      if (perm[s] >= P.L) {  // padding: never read below; its sums are zero unless inputs held NaN
        std::fill_n(dk_s.data() + s * P.Dp, P.Dp, T(0));
        std::fill_n(dv_s.data() + s * P.Dvp, P.Dvp, T(0));
      }
    }
    const T scale = static_cast<T>(P.scale);
    at::parallel_for(0, P.L, 256, [&](int64_t begin, int64_t end) {
      std::vector<T> x(P.D), gq(P.D), gk(P.D);
      constexpr int64_t kAhead = 8;  // slots are scattered: fetch the rows of a later position
      for (int64_t i = begin; i < end; ++i) {
        if (i + kAhead < end) {
          for (int64_t r = 0; r < P.nh; ++r) {
            const int64_t s = slot[r * P.Lp + i + kAhead];
            for (int64_t off = 0; off < P.Dp; off += 64 / static_cast<int64_t>(sizeof(T))) {
              __builtin_prefetch(dq_s.data() + s * P.Dp + off);
              __builtin_prefetch(dk_s.data() + s * P.Dp + off);
            }
            for (int64_t off = 0; off < P.Dvp; off += 64 / static_cast<int64_t>(sizeof(T)))
              __builtin_prefetch(dv_s.data() + s * P.Dvp + off);
          }
          if (in.qk.s3 == 1) {  // the row of qk this position reads (2 KB apart in a layer's layout)
            const uintptr_t x_row = reinterpret_cast<uintptr_t>(in.qk.row(b, h, i + kAhead));
            for (uintptr_t line = x_row & ~uintptr_t(63); line < x_row + P.D * sizeof(T); line += 64)
              __builtin_prefetch(reinterpret_cast<const void*>(line));
          }
        }
        std::fill(gq.begin(), gq.end(), T(0));
        std::fill(gk.begin(), gk.end(), T(0));
        T* v_o = const_cast<T*>(dv.row(b, h, i));
        std::fill(v_o, v_o + P.Dv, T(0));
        for (int64_t r = 0; r < P.nh; ++r) {
          const int64_t s = slot[r * P.Lp + i];
          const T* q_s = dq_s.data() + s * P.Dp;
          T* k_s = dk_s.data() + s * P.Dp;
          T* v_s = dv_s.data() + s * P.Dvp;
#pragma omp simd
          for (int64_t d = 0; d < P.D; ++d) {
            gq[d] += q_s[d];
            gk[d] += k_s[d];
            k_s[d] = T(0);  // ready for the next head
          }
#pragma omp simd
          for (int64_t d = 0; d < P.Dv; ++d) {
            v_o[d] += v_s[d];
            v_s[d] = T(0);
          }
        }
        Scratch<T>::copy_row(in.qk.row(b, h, i), in.qk.s3, P.D, x.data());
        T ss = 0, xk = 0;
        for (int64_t d = 0; d < P.D; ++d) {
          ss += x[d] * x[d];
          xk += x[d] * gk[d];
        }
        const T ms = ss / static_cast<T>(P.D) + static_cast<T>(kNormEps);
        const T n = T(1) / (std::sqrt(ms) * std::sqrt(static_cast<T>(P.D)));
        const T c = xk / (static_cast<T>(P.D) * ms);
        T* q_o = const_cast<T*>(dqk.row(b, h, i));
        for (int64_t d = 0; d < P.D; ++d) q_o[d] = scale * (gq[d] + n * (gk[d] - x[d] * c));
      }
    });
  }
}

// sum_e a[e * sa] * b[e * sb]: the backward's delta rows.
template <typename T>
T row_dot(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n) {
  T acc = 0;
  if (sa == 1 && sb == 1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t e = 0; e < n; ++e) acc += a[e] * b[e];
  } else {
    for (int64_t e = 0; e < n; ++e) acc += a[e * sa] * b[e * sb];
  }
  return acc;
}

std::tuple<Tensor, Tensor> lsh_attention_bwd(const Tensor& dout, const Tensor& qk, const Tensor& v,
                                             const Tensor& perm, const std::optional<Tensor>& key_padding_mask,
                                             const Tensor& lse_max, const Tensor& lse_log, const Tensor& out,
                                             const std::optional<Tensor>& dlse, int64_t chunk_size,
                                             int64_t n_chunks_before, int64_t n_chunks_after, bool causal,
                                             double scale) {
  const auto dims = checks::lsh_attention("lsh_attention_bwd", qk, v, perm, key_padding_mask, chunk_size,
                                          n_chunks_before, n_chunks_after);
  checks::lsh_attention_grads("lsh_attention_bwd", dims, qk, dout, lse_max, lse_log, out, dlse);
  check_permutation("lsh_attention_bwd", perm);
  const Problem P = describe(qk, v, perm, chunk_size, n_chunks_before, n_chunks_after, causal, scale);
  const auto ct = compute_type(v.scalar_type());
  const Tensor qkc = compute_view(qk, ct), vc = compute_view(v, ct), doc = compute_view(dout, ct);
  const Tensor permc = perm.to(at::kInt).contiguous();
  const Tensor lm = compute_view(lse_max, ct).contiguous(), ll = compute_view(lse_log, ct).contiguous();
  // delta = rowsum(dout * out) - dlse in one pass over the rows (as torch ops: a product tensor and
  // its sum, ~25 ms at L = 16384, H = 8 on the AVX2 EPYC).
  Tensor dl = at::empty({P.B, P.H, P.L}, v.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "lsh_attention_delta_cpu", [&] {
    const Tensor oc = compute_view(out, ct);
    const Tensor gl = dlse.has_value() ? compute_view(*dlse, ct).contiguous() : Tensor();
    const Rows<scalar_t> o_rows(oc), g_rows(doc);
    const scalar_t* g_lse = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
    scalar_t* d = dl.data_ptr<scalar_t>();
    at::parallel_for(0, P.B * P.H * P.L, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / (P.H * P.L), h = k / P.L % P.H, i = k % P.L;
        const scalar_t acc = row_dot(o_rows.row(b, h, i), o_rows.s3, g_rows.row(b, h, i), g_rows.s3, P.Dv);
        d[k] = g_lse ? acc - g_lse[k] : acc;
      }
    });
  });
  Tensor kpm;
  if (key_padding_mask.has_value()) kpm = key_padding_mask->to(at::kBool).contiguous();
  Tensor dqk = like_rows(qk, ct), dv = like_rows(v, ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "lsh_attention_bwd_cpu", [&] {
    const Inputs<scalar_t> in{Rows<scalar_t>(qkc), Rows<scalar_t>(vc), permc.data_ptr<int32_t>(),
                              kpm.defined() ? kpm.data_ptr<bool>() : nullptr};
    backward_kernel<scalar_t>(P, in, Rows<scalar_t>(doc), lm.data_ptr<scalar_t>(), ll.data_ptr<scalar_t>(),
                              dl.data_ptr<scalar_t>(), use_fast_tiles(ct), Rows<scalar_t>(dqk),
                              Rows<scalar_t>(dv));
  });
  return {dqk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(longkernels, CPU, m) {
  m.impl("lsh_hash_sort", &lsh_hash_sort);
  m.impl("lsh_attention_fwd", &lsh_attention_fwd);
  m.impl("lsh_attention_bwd", &lsh_attention_bwd);
}

}  // namespace longkernels::cpu
