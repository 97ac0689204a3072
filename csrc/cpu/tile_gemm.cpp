// AVX-512 tile products; see tile_gemm.h. Compiled for the baseline ISA with AVX-512 enabled per
// function (target attribute) and called only after a runtime CPU check (cpu_features.h), so one
// build runs on any x86-64.
#include "cpu/tile_gemm.h"

#include <algorithm>
#include <type_traits>
#include <cstring>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define LK_F32_TARGET __attribute__((target("avx512f,fma")))
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

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  gemm<float>(M, N, K, A, lda, Bp, ldb, C, ldc, accumulate);
}

void gemm_f32_at(int64_t M, int64_t N, int64_t K, const float* At, int64_t lda, const float* Bp, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
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

#else  // no AVX-512 kernels on this platform; cpu_features.h says so and callers never get here

void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "longkernels: the AVX-512 tile kernels are not compiled on this platform");
}
void gemm_f32(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "longkernels: the AVX-512 tile kernels are not compiled on this platform");
}
void gemm_f32_at(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "longkernels: the AVX-512 tile kernels are not compiled on this platform");
}
void to_bf16(const float*, uint16_t*, int64_t) {
  TORCH_CHECK(false, "longkernels: the AVX-512 tile kernels are not compiled on this platform");
}

#endif

}  // namespace longkernels::cpu::tile
