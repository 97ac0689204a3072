#pragma once
// Tile products C (fp32) [+]= A x B on pre-packed B panels: bf16 with AVX-512 BF16, fp32 with
// AVX-512F or, on CPUs without AVX-512, AVX2 + FMA (call only after the runtime checks of
// cpu_features.h: has_avx512_bf16 for gemm_bf16/to_bf16, has_f32_tiles for the fp32 products).
//
// Why our own and not the BLAS behind at::mm: (1) the BLAS offers bf16 x bf16 only with a bf16
// result, which would round attention logits to 8 bits, while vdpbf16ps keeps fp32 accumulation at
// twice the fp32 FMA rate; (2) per-call BLAS repacks both operands of every tile product, and on
// this class of CPU (AMD Zen) MKL takes its generic path. Packing keys and values once per call
// and reusing the panels for every query tile removes both costs.
//
// Layouts, with kp = 2 for bf16 (pairs along K, as vdpbf16ps multiplies pairs) and kp = 1 for fp32:
//   A row-major, A[m * lda + kp * t + e]          (t < K groups, e < kp; lda in elements)
//   B packed,    Bp[t * ldb + kp * n + e] = B[kp * t + e][n]
// One 64-byte load then gives 16 columns. N must be a multiple of 16 (callers pad with zeros).
// Register tile: 6 rows x 64 columns = 24 zmm accumulators, 4 for B, 1 broadcast (AVX-512);
// 6 rows x 16 columns = 12 ymm accumulators, 2 for B, 1 broadcast (AVX2).
#include <cstdint>

#include "cpu/cpu_features.h"

namespace longkernels::cpu::tile {

// C[M x N] (row stride ldc) = or += A * B; K counts groups of kp along the reduction.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldb,
               float* C, int64_t ldc, bool accumulate);
// `isa`: F32Tiles::Avx512 or F32Tiles::Avx2 (from f32_tiles(); never None).
void gemm_f32(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
              int64_t ldb, float* C, int64_t ldc, bool accumulate);

// C[M x N] (=|+=) A B with A given transposed: At is K x M row-major (At[t * lda + m]).
void gemm_f32_at(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* At, int64_t lda, const float* Bp,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate);

// fp32 -> bf16, round to nearest even, n elements.
void to_bf16(const float* src, uint16_t* dst, int64_t n);

}  // namespace longkernels::cpu::tile
