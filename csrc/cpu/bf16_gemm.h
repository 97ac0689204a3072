#pragma once
// C (fp32) [+]= A (bf16) x B (bf16, pair-packed) with AVX-512 BF16 dot products (vdpbf16ps).
//
// Why our own: the BLAS behind at::mm offers bfloat16 x bfloat16 only with a bfloat16 result, which
// would round attention logits to 8 bits; MKL's bf16->fp32 routine runs at fp32 speed on this class
// of CPU. vdpbf16ps multiplies pairs of bf16 and accumulates in fp32: twice the fp32 FMA rate,
// with FlashAttention's numerics (bf16 operands, fp32 accumulation).
//
// Layouts. A is row-major with pairs along K contiguous: A[m * lda + 2 t + {0,1}] (lda in bf16
// elements, even). B is pair-packed: Bp[t * ldb + 2 n + {0,1}] = (B[2t][n], B[2t+1][n]); one 64-byte
// load gives 16 columns' pairs. N must be a multiple of 16 (callers pad with zeros).
// Register tile: kMR rows x (kNV x 16) columns = 24 zmm accumulators, 4 for B, 1 broadcast.
#include <cstdint>

namespace longkernels::cpu::bf16 {

// C[M x N] (row stride ldc) = or += A[M x 2K] * B[2K x N]; K counts pairs.
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);

// fp32 -> bf16, round to nearest even, n elements.
void convert(const float* src, uint16_t* dst, int64_t n);

}  // namespace longkernels::cpu::bf16
