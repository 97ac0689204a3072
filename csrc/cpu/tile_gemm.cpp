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

// The same with A given transposed as pairs: the pair (m, t) is the 32-bit word At[t * lda + m] (lda in words),
// for products such as P^T dO on P's rows interleaved into pairs (no transpose of P).
template <int MR, int NV>
LK_BF16_TARGET void micro_bf16_at(const uint32_t* At, int64_t lda, const uint16_t* Bp, int64_t ldb, float* C,
                                  int64_t ldc, int64_t K, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < K; ++t) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(Bp + t * ldb + 32 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(At[t * lda + m]));
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

// One or two rows of C over NV * 8 columns (MR * NV = 8 accumulators): with one row, the 6-row kernel's
// 16-column tile leaves two dependent FMA chains, so each step waits on the FMA latency (decoding's P V has one
// to four rows). Every C element still sums t in order, as micro_avx2 does: the same results, bit for bit.
template <int MR, int NV, bool AT>
LK_AVX2_TARGET void micro_avx2_wide(const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C, int64_t ldc,
                                    int64_t K, bool accumulate) {
  static_assert(MR * NV == 8, "eight accumulators");
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[m][v] = accumulate ? _mm256_loadu_ps(C + m * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t t = 0; t < K; ++t) {
    const float* b = Bp + t * ldb;
    if constexpr (MR == 1) {
      const __m256 a = _mm256_broadcast_ss(A + t * (AT ? lda : 1));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[0][v] = _mm256_fmadd_ps(a, _mm256_loadu_ps(b + 8 * v), c[0][v]);
    } else {
      __m256 bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 a = _mm256_broadcast_ss(AT ? A + t * lda + m : A + m * lda + t);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) c[m][v] = _mm256_fmadd_ps(a, bv[v], c[m][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + m * ldc + 8 * v, c[m][v]);
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
  if (M <= 2) {  // one or two rows: wide tiles (eight independent accumulators), 16-column tiles for the rest
    const int64_t width = M == 1 ? 64 : 32;
    const MicroAvx2 wide = M == 1 ? micro_avx2_wide<1, 8, AT> : micro_avx2_wide<2, 4, AT>;
    int64_t n0 = 0;
    for (; n0 + width <= N; n0 += width) wide(A, lda, Bp + n0, ldb, C + n0, ldc, K, accumulate);
    const MicroAvx2 narrow = pick_avx2<AT>(static_cast<int>(M));
    for (; n0 < N; n0 += 16) narrow(A, lda, Bp + n0, ldb, C + n0, ldc, K, accumulate);
    return;
  }
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

using MicroBf16At = void (*)(const uint32_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t, bool);
template <int MR>
MicroBf16At pick_bf16_at_nv(int nv) {
  switch (nv) {
    case 1: return micro_bf16_at<MR, 1>;
    case 2: return micro_bf16_at<MR, 2>;
    case 3: return micro_bf16_at<MR, 3>;
    default: return micro_bf16_at<MR, 4>;
  }
}
MicroBf16At pick_bf16_at(int mr, int nv) {
  switch (mr) {
    case 1: return pick_bf16_at_nv<1>(nv);
    case 2: return pick_bf16_at_nv<2>(nv);
    case 3: return pick_bf16_at_nv<3>(nv);
    case 4: return pick_bf16_at_nv<4>(nv);
    case 5: return pick_bf16_at_nv<5>(nv);
    default: return pick_bf16_at_nv<6>(nv);
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

void gemm_bf16_at(int64_t M, int64_t N, int64_t K, const uint32_t* At, int64_t lda, const uint16_t* Bp, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - n0) / 16));
    const MicroBf16At full = pick_bf16_at(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR) full(At + m0, lda, Bp + 2 * n0, ldb, C + m0 * ldc + n0, ldc, K, accumulate);
    if (m0 < M)
      pick_bf16_at(static_cast<int>(M - m0), nv)(At + m0, lda, Bp + 2 * n0, ldb, C + m0 * ldc + n0, ldc, K, accumulate);
  }
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

namespace {

LK_F32_TARGET void transpose16x16(const uint32_t* const* rows, int64_t c0, uint32_t* dst, int64_t dld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows[i] + c0);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * dld, r[i]);
}

LK_AVX2_TARGET void transpose8x8(const uint32_t* const* rows, int64_t c0, uint32_t* dst, int64_t dld) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows[i] + c0));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(dst + i * dld), r[i]);
}

}  // namespace

void transpose32(F32Tiles isa, const uint32_t* const* rows, int64_t n_rows, int64_t cols, uint32_t* dst,
                 int64_t dst_ld, int64_t rows_pad) {
  const int64_t b = isa == F32Tiles::Avx512 ? 16 : isa == F32Tiles::Avx2 ? 8 : 1;
  const int64_t r_full = b > 1 ? n_rows / b * b : 0, c_full = b > 1 ? cols / b * b : 0;
  for (int64_t r0 = 0; r0 < r_full; r0 += b)
    for (int64_t c0 = 0; c0 < c_full; c0 += b) {
      if (b == 16) {
        transpose16x16(rows + r0, c0, dst + c0 * dst_ld + r0, dst_ld);
      } else {
        transpose8x8(rows + r0, c0, dst + c0 * dst_ld + r0, dst_ld);
      }
    }
  // Edges (rows or columns past the last full block) word by word.
  for (int64_t c = 0; c < cols; ++c) {
    uint32_t* d = dst + c * dst_ld;
    for (int64_t r = c < c_full ? r_full : 0; r < n_rows; ++r) d[r] = rows[r][c];
    std::fill(d + n_rows, d + rows_pad, 0u);
  }
}

LK_BF16_TARGET void interleave_rows_bf16(const uint16_t* const* rows, int64_t n_rows, int64_t cols, uint16_t* dst,
                                         int64_t dst_ld, int64_t cols_pad) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 16; ++i) {
    lo_idx[2 * i] = static_cast<uint16_t>(i), lo_idx[2 * i + 1] = static_cast<uint16_t>(32 + i);
    hi_idx[2 * i] = static_cast<uint16_t>(16 + i), hi_idx[2 * i + 1] = static_cast<uint16_t>(48 + i);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  const int64_t c_full = cols / 32 * 32;
  for (int64_t t = 0; 2 * t < n_rows; ++t) {
    const uint16_t* a = rows[2 * t];
    const bool has_b = 2 * t + 1 < n_rows;
    const uint16_t* b = has_b ? rows[2 * t + 1] : nullptr;
    uint16_t* d = dst + t * dst_ld;
    for (int64_t c = 0; c < c_full; c += 32) {
      const __m512i x = _mm512_loadu_si512(a + c);
      const __m512i y = has_b ? _mm512_loadu_si512(b + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + 2 * c, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_storeu_si512(d + 2 * c + 32, _mm512_permutex2var_epi16(x, hi, y));
    }
    for (int64_t c = c_full; c < cols; ++c) {
      d[2 * c] = a[c];
      d[2 * c + 1] = has_b ? b[c] : uint16_t(0);
    }
    std::fill(d + 2 * cols, d + 2 * cols_pad, uint16_t(0));
  }
}

namespace {

// Lane j of the result: the sum of v[j]'s 16 lanes. Pairs within 128-bit lanes, then 64-bit halves, then the
// four 128-bit lanes: 45 operations for 16 sums.
LK_F32_TARGET inline __m512 hsum16(const __m512* v) {
  __m512 w[8], y[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

LK_F32_TARGET void dots_f32_avx512(int64_t R, int64_t D, const float* Q, int64_t ldq, const float* const* rows,
                                   int64_t n, float* S, int64_t lds) {
  __mmask16 live[16];
  const float* ptr[16];
  for (int j = 0; j < 16; ++j) {
    live[j] = j < n ? 0xFFFF : 0;  // keys past n: loads masked off entirely (never touch memory)
    ptr[j] = rows[j < n ? j : 0];
  }
  const int64_t full = D / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (D - full)) - 1);
  for (int64_t r = 0; r < R; ++r) {
    const float* q = Q + r * ldq;
    __m512 acc[16];
    // Key by key, each row read front to back: the hardware prefetchers then see the cache as the sequential
    // stream it is (interleaving 16 rows chunk by chunk left a core at ~40% of its bandwidth).
    for (int j = 0; j < 16; ++j) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < full; d += 16)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_maskz_loadu_ps(live[j], ptr[j] + d), a);
      if (tail)
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q + full), _mm512_maskz_loadu_ps(live[j] & tail, ptr[j] + full), a);
      acc[j] = a;
    }
    _mm512_mask_storeu_ps(S + r * lds, static_cast<__mmask16>((1u << n) - 1), hsum16(acc));
  }
}

// Lane j of the result: the sum of v[j]'s 8 lanes (pairs, quads, then the two 128-bit halves).
LK_AVX2_TARGET inline __m256 hsum8(const __m256* v) {
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 a = _mm256_hadd_ps(h01, h23), b = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The AVX2 twin for one or two rows: 8 keys' sums reduced together, the head dim's tail by masked loads
// (vmaskmovps does not touch the masked-off lanes' memory), keys past n read from row 0 and never stored.
LK_AVX2_TARGET void dots_f32_avx2(int64_t R, int64_t D, const float* Q, int64_t ldq, const float* const* rows,
                                  int64_t n, float* S, int64_t lds) {
  const float* ptr[16];
  for (int j = 0; j < 16; ++j) ptr[j] = rows[j < n ? j : 0];
  const int64_t full = D / 8 * 8;
  alignas(32) int32_t lanes[8];
  for (int e = 0; e < 8; ++e) lanes[e] = e < D - full ? -1 : 0;
  const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  const int groups = n > 8 ? 2 : 1;
  for (int64_t r = 0; r < R; ++r) {
    const float* q = Q + r * ldq;
    alignas(32) float out[16];
    for (int g = 0; g < groups; ++g) {
      // Eight keys at once, one accumulator each (eight independent FMA chains, each q slice loaded once);
      // every key's row is still summed front to back, as the AVX-512 kernel sums it.
      const float* const* k = ptr + 8 * g;
      __m256 acc[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < full; d += 8) {
        const __m256 qd = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[j] + d), acc[j]);
      }
      if (full < D) {
        const __m256 qd = _mm256_maskload_ps(q + full, tail);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, _mm256_maskload_ps(k[j] + full, tail), acc[j]);
      }
      _mm256_store_ps(out + 8 * g, hsum8(acc));
    }
    std::copy(out, out + n, S + r * lds);
  }
}

// All-ones in lanes [0, k) (k >= 8: all eight), for vmaskmovps.
LK_AVX2_TARGET inline __m256i first_lanes(int64_t k) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(k, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Eight float32 lanes of a row at p: float32 as stored, or bfloat16 bits widened (exact).
template <typename Src>
LK_AVX2_TARGET inline __m256 load8(const Src* p) {
  if constexpr (std::is_same_v<Src, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
  }
}
// The last len < 8 elements of a row (zeros past them), reading nothing past the row: a masked load for float32
// (vmaskmovps does not touch the masked-off lanes' memory), a copy into a zeroed buffer for bfloat16.
template <typename Src>
LK_AVX2_TARGET inline __m256 load_tail(const Src* p, int64_t len, __m256i mask) {
  if constexpr (std::is_same_v<Src, float>) {
    return _mm256_maskload_ps(p, mask);
  } else {
    alignas(16) uint16_t buf[8] = {};
    std::memcpy(buf, p, len * sizeof(uint16_t));
    return load8(buf);
  }
}

// One head-dim slice [d, d + 8) of the R x KP sums below (Tail: the row's last rest < 8 elements).
template <int R, int KP, bool Tail, typename Src>
LK_AVX2_TARGET __attribute__((always_inline)) inline void dots_slice(const float* Q, int64_t ldq, const Src* const* k,
                                                                     int64_t d, int64_t rest, __m256i tail,
                                                                     __m256* acc) {
  __m256 q[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) q[r] = Tail ? load_tail(Q + r * ldq + d, rest, tail) : load8(Q + r * ldq + d);
#pragma GCC unroll 8
  for (int kk = 0; kk < KP; ++kk) {
    const __m256 kv = Tail ? load_tail(k[kk] + d, rest, tail) : load8(k[kk] + d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r * KP + kk] = _mm256_fmadd_ps(q[r], kv, acc[r * KP + kk]);
  }
}

// The AVX2 twin, R <= 4 query rows: KP = 8 / R keys per pass (two for three rows), all R rows' sums of a key taken
// while its row slice is in a register, so each key row is read (and, for bfloat16, widened) once for the R rows:
// eight FMA chains in flight whatever R, the row loads of the next slice overlapping them. Every (row, key) sum
// runs front to back over the head dim and is reduced by hsum8, as the AVX-512 kernel's are. Keys past n read
// row 0 and are never stored.
template <int R, typename Src>
LK_AVX2_TARGET void dots_rows_avx2(int64_t D, const float* Q, int64_t ldq, const Src* const* rows, int64_t n, float* S,
                                   int64_t lds) {
  constexpr int KP = R == 1 ? 8 : R == 2 ? 4 : 2;
  const int64_t full = D / 8 * 8, rest = D - full;
  const __m256i tail = first_lanes(rest);
  for (int64_t j0 = 0; j0 < n; j0 += KP) {
    const Src* k[KP];
#pragma GCC unroll 8
    for (int kk = 0; kk < KP; ++kk) k[kk] = rows[j0 + kk < n ? j0 + kk : 0];
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    // The rows two passes ahead into L1: with few keys per pass (four rows: two) the hardware sees too few
    // streams to keep the memory busy (Llama-3-8B decode, bfloat16, on the Zen 1 EPYC: 13% faster).
    for (int64_t j = j0 + 2 * KP; j < std::min<int64_t>(j0 + 3 * KP, n); ++j) {
      const char* row = reinterpret_cast<const char*>(rows[j]);
      for (int64_t x = 0; x < D * static_cast<int64_t>(sizeof(Src)); x += 64) _mm_prefetch(row + x, _MM_HINT_T0);
    }
    for (int64_t d = 0; d < full; d += 8) dots_slice<R, KP, false>(Q, ldq, k, d, 0, tail, acc);
    if (rest) dots_slice<R, KP, true>(Q, ldq, k, full, rest, tail, acc);
    alignas(32) float out[8];
    _mm256_store_ps(out, hsum8(acc));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      for (int kk = 0; kk < KP && j0 + kk < n; ++kk) S[r * lds + j0 + kk] = out[r * KP + kk];
  }
}

// Any R, four rows at a time.
template <typename Src>
LK_AVX2_TARGET void dots_avx2(int64_t R, int64_t D, const float* Q, int64_t ldq, const Src* const* rows, int64_t n,
                              float* S, int64_t lds) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const float* q = Q + r0 * ldq;
    float* s = S + r0 * lds;
    switch (std::min<int64_t>(R - r0, 4)) {
      case 1: dots_rows_avx2<1>(D, q, ldq, rows, n, s, lds); break;
      case 2: dots_rows_avx2<2>(D, q, ldq, rows, n, s, lds); break;
      case 3: dots_rows_avx2<3>(D, q, ldq, rows, n, s, lds); break;
      default: dots_rows_avx2<4>(D, q, ldq, rows, n, s, lds); break;
    }
  }
}

// exp on U vectors of eight lanes, the polynomial of vec_math.h's exp_approx (~1 ulp), written for AVX2 + FMA
// with the U vectors' steps interleaved. The compiler's vectorisation of exp_approx did one vector at a time
// and added compare-and-blend pairs for its clamps; on Zen 1 (double-pumped ymm, a small FP scheduler) one
// vector's chain of ~15 dependent FMAs then ran at its latency, a third of a short forward's time.
// x < -87 (and -inf) gives 0, x > 88 (and +inf) exp(88), as exp_approx; a NaN stays NaN (vmaxps and vminps
// return their second operand when a comparison fails, and the not-less-than-unordered mask keeps the lane).
template <int U>
LK_AVX2_TARGET __attribute__((always_inline)) inline void exp8(__m256* x) {
  const __m256 lo = _mm256_set1_ps(-87.0f), hi = _mm256_set1_ps(88.0f), shifter = _mm256_set1_ps(12582912.0f);
  __m256 xc[U], n[U], r[U], p[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) xc[u] = _mm256_min_ps(hi, _mm256_max_ps(lo, x[u]));
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) n[u] = _mm256_fmadd_ps(xc[u], _mm256_set1_ps(1.44269504088896341f), shifter);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) n[u] = _mm256_sub_ps(n[u], shifter);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) r[u] = _mm256_fnmadd_ps(n[u], _mm256_set1_ps(0.693359375f), xc[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) r[u] = _mm256_fmadd_ps(n[u], _mm256_set1_ps(2.12194440e-4f), r[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    p[u] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r[u], _mm256_set1_ps(1.3981999507e-3f));
  constexpr float kPoly[4] = {8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) p[u] = _mm256_fmadd_ps(p[u], r[u], _mm256_set1_ps(kPoly[i]));
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = _mm256_mul_ps(p[u], r[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = _mm256_fmadd_ps(p[u], r[u], r[u]);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) p[u] = _mm256_add_ps(p[u], _mm256_set1_ps(1.0f));
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n[u]), _mm256_set1_epi32(127)), 23);
    x[u] = _mm256_and_ps(_mm256_mul_ps(p[u], _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x[u], lo, _CMP_NLT_UQ));
  }
}

// One row of the backward's softmax gradient on U vectors at column c (see softmax_grad_avx2).
template <int U>
LK_AVX2_TARGET __attribute__((always_inline)) inline void softmax_grad8(float* s, float* dp, int64_t c, __m256i live,
                                                                      __m256 scale, __m256 slope, __m256i dist,
                                                                      __m256 lse, __m256 delta) {
  __m256 x[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const __m256i k = _mm256_add_epi32(dist, _mm256_set1_epi32(static_cast<int32_t>(c + 8 * u)));
    const __m256 sv = U == 1 ? _mm256_maskload_ps(s + c, live) : _mm256_loadu_ps(s + c + 8 * u);
    x[u] = _mm256_sub_ps(_mm256_fmadd_ps(slope, _mm256_cvtepi32_ps(k), _mm256_mul_ps(sv, scale)), lse);
  }
  exp8<U>(x);
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const __m256 p = _mm256_min_ps(_mm256_set1_ps(1.0f), x[u]);  // a NaN stays NaN
    if (U == 1) {
      _mm256_maskstore_ps(s + c, live, p);
      _mm256_maskstore_ps(dp + c, live, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_maskload_ps(dp + c, live), delta)));
    } else {
      _mm256_storeu_ps(s + c + 8 * u, p);
      _mm256_storeu_ps(dp + c + 8 * u, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + c + 8 * u), delta)));
    }
  }
}

}  // namespace

LK_AVX2_TARGET void softmax_grad_avx2(float* s, float* dp, int64_t n, float scale, float slope, int32_t d0, float lse,
                                      float delta) {
  constexpr int U = 4;
  const __m256 vs = _mm256_set1_ps(scale), vk = _mm256_set1_ps(slope), vl = _mm256_set1_ps(lse),
               vd = _mm256_set1_ps(delta);
  const __m256i dist = _mm256_add_epi32(_mm256_set1_epi32(d0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t c = 0;
  for (; c + 8 * U <= n; c += 8 * U) softmax_grad8<U>(s, dp, c, all, vs, vk, dist, vl, vd);
  for (; c < n; c += 8) softmax_grad8<1>(s, dp, c, first_lanes(n - c), vs, vk, dist, vl, vd);
}

LK_AVX2_TARGET float exp_sum_avx2(float* s, int64_t n, float m) {
  constexpr int U = 4;  // vectors in flight (measured on the Zen 1 EPYC: 4 beat 2 by 4% of a short forward)
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) sum[u] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 * U <= n; c += 8 * U) {
    __m256 x[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) x[u] = _mm256_sub_ps(_mm256_loadu_ps(s + c + 8 * u), vm);
    exp8<U>(x);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      _mm256_storeu_ps(s + c + 8 * u, x[u]);
      sum[u] = _mm256_add_ps(sum[u], x[u]);
    }
  }
  for (; c < n; c += 8) {  // the rest eight at a time, the last by masked loads and stores (nothing past s + n)
    const __m256i live = first_lanes(n - c);
    __m256 x = _mm256_sub_ps(_mm256_maskload_ps(s + c, live), vm);
    exp8<1>(&x);
    x = _mm256_and_ps(x, _mm256_castsi256_ps(live));
    _mm256_maskstore_ps(s + c, live, x);
    sum[0] = _mm256_add_ps(sum[0], x);
  }
  const __m256 t = _mm256_add_ps(_mm256_add_ps(sum[0], sum[1]), _mm256_add_ps(sum[2], sum[3]));
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

void dots_f32(F32Tiles isa, int64_t R, int64_t D, const float* Q, int64_t ldq, const float* const* rows, int64_t n,
              float* S, int64_t lds) {
  if (isa == F32Tiles::Avx512) return dots_f32_avx512(R, D, Q, ldq, rows, n, S, lds);
  // One or two rows: eight keys at a time (eight rows in flight); more: each key row read once for all rows
  // (Llama-3-8B's four rows per kv head, float32, on the Zen 1 EPYC: decode 1.1x faster; with one or two rows the
  // row-at-a-time kernel measured 7% faster).
  if (R <= 2) return dots_f32_avx2(R, D, Q, ldq, rows, n, S, lds);
  dots_avx2(R, D, Q, ldq, rows, n, S, lds);
}

void dots_bf16_rows_avx2(int64_t R, int64_t D, const float* Q, int64_t ldq, const uint16_t* const* rows, int64_t n,
                         float* S, int64_t lds) {
  dots_avx2(R, D, Q, ldq, rows, n, S, lds);
}

// Columns [c, c + 8 NV) of o += sum_j p[j] rows[j], keys j < n in order from o's old value (as micro_avx2_wide sums:
// the same results, bit for bit, as on the widened rows). Tail: one vector, the row's last rest < 8 columns
// (zeros past them; nothing past the row is read).
template <int NV, bool Tail>
LK_AVX2_TARGET __attribute__((always_inline)) inline void pv_panel_bf16(const float* p, const uint16_t* const* rows,
                                                                        int64_t n, int64_t c, int64_t rest, float* o) {
  static_assert(!Tail || NV == 1, "a tail is one vector");
  __m256 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_loadu_ps(o + c + 8 * v);
  const __m256i tail = first_lanes(rest);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[v] = _mm256_fmadd_ps(pj, Tail ? load_tail(rows[j] + c, rest, tail) : load8(rows[j] + c + 8 * v), acc[v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + c + 8 * v, acc[v]);
}

LK_AVX2_TARGET void pv_bf16_row_avx2(int64_t Dv, const float* p, const uint16_t* const* rows, int64_t n, float* o) {
  int64_t c = 0;
  for (; c + 64 <= Dv; c += 64) pv_panel_bf16<8, false>(p, rows, n, c, 0, o);
  for (; c + 8 <= Dv; c += 8) pv_panel_bf16<1, false>(p, rows, n, c, 0, o);
  if (c < Dv) pv_panel_bf16<1, true>(p, rows, n, c, Dv - c, o);
}

LK_AVX2_TARGET void widen_bf16(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &bits, 4);
  }
}

LK_BF16_TARGET void dots_bf16(int64_t R, int64_t D, const uint16_t* Q, int64_t ldq, const uint16_t* const* rows,
                              int64_t n, float* S, int64_t lds) {
  __mmask32 live[16];
  const uint16_t* ptr[16];
  for (int j = 0; j < 16; ++j) {
    live[j] = j < n ? 0xFFFFFFFFu : 0u;
    ptr[j] = rows[j < n ? j : 0];
  }
  const int64_t full = D / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (D - full)) - 1);
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* q = Q + r * ldq;
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) {  // key by key, rows front to back (as in dots_f32)
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < full; d += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_maskz_loadu_epi16(live[j], ptr[j] + d));
      if (tail)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, q + full),
                             (__m512bh)_mm512_maskz_loadu_epi16(live[j] & tail, ptr[j] + full));
      acc[j] = a;
    }
    _mm512_mask_storeu_ps(S + r * lds, static_cast<__mmask16>((1u << n) - 1), hsum16(acc));
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
void transpose32(F32Tiles, const uint32_t* const* rows, int64_t n_rows, int64_t cols, uint32_t* dst, int64_t dst_ld,
                 int64_t rows_pad) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < n_rows; ++r) dst[c * dst_ld + r] = rows[r][c];
    for (int64_t r = n_rows; r < rows_pad; ++r) dst[c * dst_ld + r] = 0;
  }
}
void gemm_bf16_at(int64_t, int64_t, int64_t, const uint32_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                  bool) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void dots_f32(F32Tiles, int64_t, int64_t, const float*, int64_t, const float* const*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void dots_bf16(int64_t, int64_t, const uint16_t*, int64_t, const uint16_t* const*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void interleave_rows_bf16(const uint16_t* const*, int64_t, int64_t, uint16_t*, int64_t, int64_t) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void pv_bf16_row_avx2(int64_t, const float*, const uint16_t* const*, int64_t, float*) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void widen_bf16(const uint16_t*, int64_t, float*) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
float exp_sum_avx2(float*, int64_t, float) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void dots_bf16_rows_avx2(int64_t, int64_t, const float*, int64_t, const uint16_t* const*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}
void softmax_grad_avx2(float*, float*, int64_t, float, float, int32_t, float, float) {
  TORCH_CHECK(false, "longkernels: the x86 tile kernels are not compiled on this platform");
}

#endif

}  // namespace longkernels::cpu::tile
