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
// The same with A given transposed as pairs: pair (m, t) is the 32-bit word At[t * lda + m] (lda in words).
void gemm_bf16_at(int64_t M, int64_t N, int64_t K, const uint32_t* At, int64_t lda, const uint16_t* Bp, int64_t ldb,
                  float* C, int64_t ldc, bool accumulate);
// `isa`: F32Tiles::Avx512 or F32Tiles::Avx2 (from f32_tiles(); never None).
void gemm_f32(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* Bp,
              int64_t ldb, float* C, int64_t ldc, bool accumulate);

// C[M x N] (=|+=) A B with A given transposed: At is K x M row-major (At[t * lda + m]).
void gemm_f32_at(F32Tiles isa, int64_t M, int64_t N, int64_t K, const float* At, int64_t lda, const float* Bp,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate);

// fp32 -> bf16, round to nearest even, n elements.
void to_bf16(const float* src, uint16_t* dst, int64_t n);

// Packing of operands stored row by row (a key or value block as the caller holds it: one pointer per row,
// so rows may come from two tensors, memory and segment, with any row strides), for the B panels above.
// transpose32: dst[c * dst_ld + r] = rows[r][c] for 32-bit words, r < n_rows, c < cols; dst columns
// [n_rows, rows_pad) are zero (rows_pad a multiple of 16). Keys (rows) x head dim (cols) become the panel
// of S = Q K^T: fp32 words for gemm_f32, bf16 pairs (one word) for gemm_bf16. `isa` picks 16 x 16
// (AVX-512) or 8 x 8 (AVX2) register transposes; None: plain loops.
void transpose32(F32Tiles isa, const uint32_t* const* rows, int64_t n_rows, int64_t cols, uint32_t* dst,
                 int64_t dst_ld, int64_t rows_pad);
// bf16 rows into pairs along the rows, the B panel of O += P V for gemm_bf16:
// dst[t * dst_ld + 2 c + e] = rows[2 t + e][c], zero past n_rows and for c in [cols, cols_pad) (cols_pad a
// multiple of 16). AVX-512 BW (call where has_avx512_bf16).
void interleave_rows_bf16(const uint16_t* const* rows, int64_t n_rows, int64_t cols, uint16_t* dst, int64_t dst_ld,
                          int64_t cols_pad);

// S[r * lds + j] = <Q[r], rows[j]> over D elements, r < R, j < n <= 16: dot products along the head dim, the 16
// keys' sums reduced together (masked loads at the ends, so nothing past a row is read). For few query rows
// (decoding), where transposing the keys into a panel costs more than the products themselves. dots_f32 runs
// on `isa` (AVX-512 or AVX2); dots_bf16 needs AVX-512 BF16.
void dots_f32(F32Tiles isa, int64_t R, int64_t D, const float* Q, int64_t ldq, const float* const* rows, int64_t n, float* S,
              int64_t lds);
void dots_bf16(int64_t R, int64_t D, const uint16_t* Q, int64_t ldq, const uint16_t* const* rows, int64_t n, float* S,
               int64_t lds);

// dots_f32's AVX2 products on bfloat16 key rows (float32 queries), each row widened as it is read: decoding a
// bfloat16 cache on CPUs without AVX-512 BF16, without a widened copy of the keys (AVX2; call where
// has_f32_tiles). The same sums, bit for bit, as dots_f32 on the widened rows; any n (not only 16: a whole
// decode block per call, so the rows ahead can be prefetched across it).
void dots_bf16_rows_avx2(int64_t R, int64_t D, const float* Q, int64_t ldq, const uint16_t* const* rows, int64_t n,
                         float* S, int64_t lds);

// o[c] += sum_j p[j] rows[j][c], c < Dv, j < n in order (AVX2; call where has_f32_tiles): decoding's o += p V for
// one query row over bfloat16 value rows where they lie, widened as read, 64 columns at a time (eight
// accumulators), so most of each row is read in one pass and nothing is copied. The same sums, bit for bit, as
// gemm_f32 on the widened rows. Columns [Dv, Dv rounded up to 8) of o get p times zero added (so stay as they
// are unless p holds an infinity or NaN); nothing past a row is read.
void pv_bf16_row_avx2(int64_t Dv, const float* p, const uint16_t* const* rows, int64_t n, float* o);

// dst[i] = float(bf16 bits src[i]), i < n (AVX2; call where has_f32_tiles): bfloat16 rows widened as they are read.
void widen_bf16(const uint16_t* src, int64_t n, float* dst);

// s[i] = exp(s[i] - m) for i < n, returning their sum (AVX2 + FMA; call where has_f32_tiles): the softmax
// row's exponentials, as vec_math.h's exp_approx computes them. For m the row's maximum (arguments <= 0).
float exp_sum_avx2(float* s, int64_t n, float m);
// The backward's softmax gradient over one row (AVX2 + FMA): for c < n, with logit = scale s[c] + slope (c + d0),
// s[c] = p = min(exp(logit - lse), 1) and dp[c] = p (dp[c] - delta); the exponential as exp_sum_avx2's.
void softmax_grad_avx2(float* s, float* dp, int64_t n, float scale, float slope, int32_t d0, float lse, float delta);

}  // namespace longkernels::cpu::tile
