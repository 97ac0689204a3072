// Tile products; see tile_gemm.h. Compiled for the baseline ISA with AVX-512 (or AVX2 + FMA)
// enabled per function (target attribute) and dispatched by a runtime CPU check (cpu_features.h),
// so one build runs on any x86-64 and uses the widest vectors the machine has.
#include "cpu/tile_gemm.h"

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define LK_F32_TARGET __attribute__((target("avx512f,fma")))
#define LK_AVX2_TARGET __attribute__((target("avx2,fma")))
#define LK_HAVE_TILE_KERNELS 1
#endif

namespace longkernels::cpu::tile {

#ifdef LK_HAVE_TILE_KERNELS
namespace {

constexpr int kMR = 6;
constexpr int kNV = 4;  // zmm columns per register tile (64 floats)

template <int MR, int NV>
LK_BF16_TARGET void micro_bf16(const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldb, float* C,
                               int64_t ldc, int64_t K, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < K; ++t) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(Bp + t * ldb + 32 * v);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * t, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
}

template <int MR, int NV>
LK_F32_TARGET void micro_f32(const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C, int64_t ldc,
                             int64_t K, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < K; ++t) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(Bp + t * ldb + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(A[m * lda + t]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(a, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
}

// The same with A stored transposed (A^T row-major: element (m, t) at A[t * lda + m]), for
// products such as P^T dO that read a tile column-wise; saves transposing it first.
template <int MR, int NV>
LK_F32_TARGET void micro_f32_at(const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C, int64_t ldc,
                                int64_t K, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < K; ++t) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(Bp + t * ldb + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512 a = _mm512_set1_ps(A[t * lda + m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(a, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
}

// AVX2 + FMA (CPUs without AVX-512: AMD Zen 1-3, most Intel client parts): 8-wide registers,
// 16 of them, so the register tile is 6 rows x 16 columns = 12 ymm accumulators, 2 for B, 1
// broadcast. Same operand layouts as the AVX-512 kernels (16-column panels), so callers do not care
// which one runs.
// The accumulators are named variables, not an array: GCC keeps an array of 12 ymm in memory and
// stores it back after every FMA (measured: a third of the FMA rate).
template <int MR, bool AT>
LK_AVX2_TARGET void micro_avx2(const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C, int64_t ldc,
                               int64_t K, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define LK_ROWS(X) X(0, c00, c01) X(1, c10, c11) X(2, c20, c21) X(3, c30, c31) X(4, c40, c41) X(5, c50, c51)
#define LK_LOAD(m, x0, x1)                  \
  if constexpr (MR > m) {                   \
    x0 = _mm256_loadu_ps(C + m * ldc);      \
    x1 = _mm256_loadu_ps(C + m * ldc + 8);  \
  }
#define LK_FMA(m, x0, x1)                                                           \
  if constexpr (MR > m) {                                                           \
    const __m256 a = _mm256_broadcast_ss(AT ? A + t * lda + m : A + m * lda + t);   \
    x0 = _mm256_fmadd_ps(a, b0, x0);                                                \
    x1 = _mm256_fmadd_ps(a, b1, x1);                                                \
  }
#define LK_STORE(m, x0, x1)                 \
  if constexpr (MR > m) {                   \
    _mm256_storeu_ps(C + m * ldc, x0);      \
    _mm256_storeu_ps(C + m * ldc + 8, x1);  \
  }
  if (accumulate) {
    LK_ROWS(LK_LOAD)
  }
  for (int64_t t = 0; t < K; ++t) {
    const __m256 b0 = _mm256_loadu_ps(Bp + t * ldb), b1 = _mm256_loadu_ps(Bp + t * ldb + 8);
    LK_ROWS(LK_FMA)
  }
  LK_ROWS(LK_STORE)
#undef LK_STORE
#undef LK_FMA
#undef LK_LOAD
#undef LK_ROWS
}

using MicroAvx2 = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool);
template <bool AT>
MicroAvx2 pick_avx2(int mr) {
  switch (mr) {
    case 1: return micro_avx2<1, AT>;
    case 2: return micro_avx2<2, AT>;
    case 3: return micro_avx2<3, AT>;
    case 4: return micro_avx2<4, AT>;
    case 5: return micro_avx2<5, AT>;
    default: return micro_avx2<6, AT>;
  }
}

// Column panels of 16 outermost, as below; `AT`: A stored transposed (rows m are columns of At).
template <bool AT>
void gemm_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  constexpr int64_t kMR2 = 6;
  const MicroAvx2 full = pick_avx2<AT>(kMR2);
  // A 16-column panel is one cache line per row: with a long row stride (keys packed for a whole
  // sequence) its K lines fall into few L1 sets and evict each other between row blocks, so a
  // panel read by more than one row block is first copied into a contiguous buffer (one core of
  // the AVX2 EPYC, 256 x 512 x 64 with a row stride of 4096 floats: 37 GFLOP/s unpacked, 60 packed).
  // A stride of at most 64 floats (256 B; LSH attention's 64-wide tiles) spreads the panel's lines
  // over at least 16 of the 64 sets, 4 per set for K = 64, so there the copy is pure cost (LSH
  // attention at L = 16384, paired A/B: attend forward 4-9% and backward 1-4% faster without it).
  thread_local std::vector<float> panel;
  const bool pack = M > kMR2 && ldb > 64;
  if (pack && static_cast<int64_t>(panel.size()) < 16 * K) panel.resize(16 * K);
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const float* B = Bp + n0;
    int64_t ld = ldb;
    if (pack) {
      for (int64_t t = 0; t < K; ++t) std::memcpy(panel.data() + 16 * t, Bp + t * ldb + n0, 16 * sizeof(float));
      B = panel.data(), ld = 16;
    }
    int64_t m0 = 0;
    for (; m0 + kMR2 <= M; m0 += kMR2) full(AT ? A + m0 : A + m0 * lda, lda, B, ld, C + m0 * ldc + n0, ldc, K, accumulate);
    if (m0 < M)
      pick_avx2<AT>(static_cast<int>(M - m0))(AT ? A + m0 : A + m0 * lda, lda, B, ld, C + m0 * ldc + n0, ldc, K,
                                              accumulate);
  }
}

template <typename E>
using Micro = void (*)(const E*, int64_t, const E*, int64_t, float*, int64_t, int64_t, bool);

template <typename E, int MR>
Micro<E> pick_nv(int nv) {
  if constexpr (std::is_same_v<E, float>) {
    switch (nv) {
      case 1: return micro_f32<MR, 1>;
      case 2: return micro_f32<MR, 2>;
      case 3: return micro_f32<MR, 3>;
      default: return micro_f32<MR, 4>;
    }
  } else {
    switch (nv) {
      case 1: return micro_bf16<MR, 1>;
      case 2: return micro_bf16<MR, 2>;
      case 3: return micro_bf16<MR, 3>;
      default: return micro_bf16<MR, 4>;
    }
  }
}

template <typename E>
Micro<E> pick(int mr, int nv) {
  switch (mr) {
    case 1: return pick_nv<E, 1>(nv);
    case 2: return pick_nv<E, 2>(nv);
    case 3: return pick_nv<E, 3>(nv);
    case 4: return pick_nv<E, 4>(nv);
    case 5: return pick_nv<E, 5>(nv);
    default: return pick_nv<E, 6>(nv);
  }
}

using MicroAt = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool);
template <int MR>
MicroAt pick_at_nv(int nv) {
  switch (nv) {
    case 1: return micro_f32_at<MR, 1>;
    case 2: return micro_f32_at<MR, 2>;
    case 3: return micro_f32_at<MR, 3>;
    default: return micro_f32_at<MR, 4>;
  }
}
MicroAt pick_at(int mr, int nv) {
  switch (mr) {
    case 1: return pick_at_nv<1>(nv);
    case 2: return pick_at_nv<2>(nv);
    case 3: return pick_at_nv<3>(nv);
    case 4: return pick_at_nv<4>(nv);
    case 5: return pick_at_nv<5>(nv);
    default: return pick_at_nv<6>(nv);
  }
}

// Column blocks outermost: a B panel (K groups x 64 columns) stays in L1/L2 for every row block.
template <typename E>
void gemm(int64_t M, int64_t N, int64_t K, const E* A, int64_t lda, const E* Bp, int64_t ldb, float* C, int64_t ldc,
          bool accumulate) {
  constexpr int64_t kp = std::is_same_v<E, float> ? 1 : 2;
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / 16));
    const Micro<E> full = pick<E>(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR) full(A + m0 * lda, lda, Bp + kp * n0, ldb, C + m0 * ldc + n0, ldc, K, accumulate);
    if (m0 < M)
      pick<E>(static_cast<int>(M - m0), nv)(A + m0 * lda, lda, Bp + kp * n0, ldb, C + m0 * ldc + n0, ldc, K,
                                            accumulate);
  }
}

}  // namespace

void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldb,
               float* C, int64_t ldc, bool accumulate) {
  gemm<uint16_t>(M, N, K, A, lda, Bp, ldb, C, ldc, accumulate);
}

void gemm_f32(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
              int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (isa != F32Tiles::Avx512) return gemm_avx2<false>(M, N, K, A, lda, Bp, ldb, C, ldc, accumulate);
  gemm<float>(M, N, K, A, lda, Bp, ldb, C, ldc, accumulate);
}

void gemm_f32_at(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* At, int64_t lda, const float* Bp,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (isa != F32Tiles::Avx512) return gemm_avx2<true>(M, N, K, At, lda, Bp, ldb, C, ldc, accumulate);
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / 16));
    const MicroAt full = pick_at(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR) full(At + m0, lda, Bp + n0, ldb, C + m0 * ldc + n0, ldc, K, accumulate);
    if (m0 < M) pick_at(static_cast<int>(M - m0), nv)(At + m0, lda, Bp + n0, ldb, C + m0 * ldc + n0, ldc, K, accumulate);
  }
}

LK_BF16_TARGET void to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)packed);
  }
  for (; i < n; ++i) {
    const __m512bh one = _mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_set1_ps(src[i]));
    uint16_t out[32];
    _mm512_storeu_si512(out, (__m512i)one);
    dst[i] = out[0];
  }
}

#else  // no x86 tile kernels on this platform; cpu_features.h says so and callers never get here

void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void gemm_f32(F32Tiles, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
              bool) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void gemm_f32_at(F32Tiles, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                 bool) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void to_bf16(const float*, uint16_t*, int64_t) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}

#endif

}  // namespace longkernels::cpu::tile
