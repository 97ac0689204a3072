// Memory-segment causal attention on CUDA: forward and backward (docs/semantics.md §1).
//
// FlashAttention-2 structure on plain CUDA cores: online softmax over key tiles held in shared
// memory, no (N x (M + N)) matrix ever stored, the backward recomputing P from the saved LSE.
// Products accumulate in float (double for double inputs); tiles are converted once on load, so
// half/bfloat16 inputs cost no more arithmetic than float ones.
//
// Keys come in two ranges, memory [0, M) then current [M, M + N). Key tiles are aligned to their
// range's start and never straddle the two, so the kernels read mem_k/k (mem_v/v) in place, with
// their own strides, and never concatenate. For a query tile the visible keys form one interval;
// only key tiles meeting it are visited, and the per-element mask runs only on tiles that the causal
// diagonal, the window edge or a range end cuts, or on every visited tile when a padding mask or document ids
// are given (tested pair by pair: no tile is skipped for them here; the Triton kernels, first on CUDA
// tensors, skip the tiles outside a query tile's documents). Softcap, sinks and a query offset (queries at
// q_offset + i, a ring step's block pair) are terms of the logits and of the row's end; a row that sees no key
// gets output 0 and LSE -inf (or its sink), as on the CPU (common/memory_attention_rows.h). The schedule
// lives in memory_attention_schedule.h, host-includable: csrc/tests/test_cuda_host_logic.cpp checks it
// against the pairwise mask without a GPU.
//
// Backward = two kernels, both free of atomics and hence deterministic:
//   dkdv_kernel  one block per key tile: dk, dv summed over the GQA group in registers;
//   dq_kernel    one block per query tile (the forward's schedule): dq in registers.
// The dq pass recomputes S and dP once more (7 tile products instead of 5), which buys
// determinism and no float32 dq buffer.

// c10/cuda headers only, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE headers,
// and this file must also compile (.ci/compile_cuda.sh) with a bare toolkit and a CPU torch.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/memory_attention_rows.h"
#include "common/op_checks.h"
#include "cuda/memory_attention_schedule.h"

namespace longkernels::gpu {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kMaxHeadDim = 256;

// Forward and dq: 4 warps x 8 query rows; key tiles of 32, one key column per lane, so a row's
// softmax statistics are warp reductions and never cross warps.
constexpr int kRows = 8;
constexpr int kQWarps = 4;
constexpr int kBQ = kQWarps * kRows;
constexpr int kBK = kWarp;

// dk/dv: 8 warps x 4 key rows; query tiles of 32, one query per lane. Four rows keep the dk and dv
// accumulators (4 x 8 each at head dim 256) within the register file. Double uses 4 warps (key
// tiles of 16): at head dim 256 its 32-key tiles would need 272 KiB of shared memory.
constexpr int kKRows = 4;
constexpr int kBQkv = kWarp;
template <typename scalar_t>
constexpr int kv_warps() {
  return sizeof(at::acc_type<scalar_t, true>) == 8 ? 4 : 8;
}

// Blocks per SM promised to ptxas for dkdv_kernel, which sets its register budget: left to itself,
// ptxas squeezes the 256-thread float variants into 64 registers and spills; with two blocks
// (<= 128 registers) they spill 16 bytes at most. Double accumulators take the whole budget. The
// 128-thread kernels hardly spill under ptxas's own choice (ptxas -v, sm_80 and sm_90).
template <typename scalar_t>
constexpr int kv_min_blocks() {
  return sizeof(at::acc_type<scalar_t, true>) == 8 ? 1 : 2;
}

__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

// Row stride of a shared tile read column-wise by the lanes (lane c reads row c): an odd stride
// puts the 32 rows in 32 different banks (for 8-byte doubles, within each half-warp phase).
__host__ __device__ constexpr int odd_ld(int d) { return d | 1; }

// A (B, heads, L, D) tensor read through its own strides, so transposed layouts need no copy.
template <typename T>
struct View4 {
  T* ptr;
  int64_t sb, sh, sl, sd;
  __device__ T* row(int64_t b, int64_t h, int64_t l) const { return ptr + b * sb + h * sh + l * sl; }
};

template <typename T>
View4<T> view4(const Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename scalar_t>
struct Params {
  using acc_t = at::acc_type<scalar_t, true>;
  View4<const scalar_t> q, k, v, mk, mv, dout;
  View4<scalar_t> out, dq, dk, dv, dmk, dmv;
  acc_t* lse;            // (B, H, N) contiguous: written by the forward, read by the backward
  const acc_t* delta;    // (B, H, N) contiguous
  const acc_t* slopes;   // (H,) or nullptr
  const acc_t* sinks;    // (H,) or nullptr
  // key_padding_mask (B, M + N), True = padding, own strides; document_ids (B, M + N) as int64, contiguous.
  // Either or both may be nullptr; `masks` says whether one is given (every tile then tests each pair).
  const bool* pad;
  int64_t pad_sb, pad_sl;
  const int64_t* doc;
  int64_t doc_sb;
  bool masks;
  int H, Hkv, group, D, Dv;
  int64_t N, M, Q0, window;  // Q0: position of query 0 (M unless q_offset says otherwise); window 0: none
  bool causal;
  acc_t scale;
  acc_t cap, cap_inner;  // softcap: cap * tanh(dot * cap_inner), cap_inner = scale / cap; cap 0: none
  __device__ tiles::Geometry geometry() const { return {N, M, Q0, causal, window}; }
  // Whether the padding and document masks keep key j (absolute position) for query i < N (documents need
  // Q0 = M: query i's document is that of position M + i). Pairs are tested one by one, so any ids work.
  __device__ bool keeps(int64_t b, int64_t i, int64_t j) const {
    if (pad != nullptr && pad[b * pad_sb + j * pad_sl]) return false;
    return doc == nullptr || doc[b * doc_sb + M + i] == doc[b * doc_sb + j];
  }
  // The logit of query i and key j from the raw dot product (softcap, then ALiBi); *t: the softcap's tanh.
  __device__ acc_t logit(acc_t dot, acc_t slope, int64_t i, int64_t j, acc_t* t) const {
    const acc_t x = cap != acc_t(0) ? rows::softcap_logit(dot, cap_inner, cap, t) : dot * scale;
    return x - slope * static_cast<acc_t>(Q0 + i - j);
  }
};

// Whether query i sees key j: in_tile (the pair lies inside the tile's valid rows and columns), the
// geometry (causality, window, query offset) and, with masks, padding and documents. The masks are read only
// for a query row < N and a key < M + N (an owned tile's rows past the end are computed, never written).
template <typename scalar_t>
__device__ __forceinline__ bool pair_seen(const Params<scalar_t>& p, const tiles::Geometry& g, int64_t b, int64_t i,
                                          int64_t j, bool in_tile) {
  if (!in_tile || !tiles::visible(g, i, j)) return false;
  return !p.masks || (i < p.N && j < p.M + p.N && p.keeps(b, i, j));
}

// d logit / d (scale * dot): 1, or 1 - tanh^2 through the softcap (t: the forward's tanh, recomputed).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t capped_slope(const Params<scalar_t>& p, acc_t t) {
  return p.cap != acc_t(0) ? acc_t(1) - t * t : acc_t(1);
}

// Copies rows [0, rows) x columns [0, cols) of a strided (L, D) slice into shared memory with row
// stride ld, converting to the accumulation type. Rows at or past `valid` are zeros: products
// they feed stay finite, and they are either masked or never written.
template <typename acc_t, typename scalar_t>
__device__ void load_tile(acc_t* dst, int ld, const scalar_t* src, int64_t sl, int64_t sd, int rows, int valid,
                          int cols) {
  const int lane = threadIdx.x % kWarp, nwarps = blockDim.x / kWarp;
  for (int r = threadIdx.x / kWarp; r < rows; r += nwarps)
    for (int c = lane; c < cols; c += kWarp)
      dst[r * ld + c] = r < valid ? static_cast<acc_t>(src[r * sl + c * sd]) : acc_t(0);
}

// A NaN wins (x != x keeps it; a comparison with a NaN y fails and takes y): a NaN logit must reach its
// row, as in the reference's softmax.
template <typename T>
__device__ __forceinline__ T nan_max(T x, T y) {
  return (x != x || x > y) ? x : y;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// exp(logit - lse) in the backward, at most 1: recomputed from the LSE it can round above 1 where logits
// are huge; the comparison keeps a NaN a NaN.
template <typename T>
__device__ __forceinline__ T prob(T x) {
  const T p = rows::exp_of(x);
  return p > T(1) ? T(1) : p;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__host__ __device__ constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Shared-memory layouts (element offsets in acc_t), one definition for the kernel and its launch.
struct FwdSmem {
  int q, kv, p, total;
  __host__ __device__ FwdSmem(int D, int Dv)
      : q(0), kv(kBQ * D), p(kv + kBK * imax(odd_ld(D), Dv)), total(p + kBQ * kBK) {}
};
struct DqSmem {
  int q, dout, kv, ds, total;
  __host__ __device__ DqSmem(int D, int Dv)
      : q(0), dout(kBQ * D), kv(dout + kBQ * Dv), ds(kv + kBK * imax(odd_ld(D), odd_ld(Dv))), total(ds + kBQ * kBK) {}
};
struct DkdvSmem {
  int k, v, q, dout, p, ds, total;
  __host__ __device__ DkdvSmem(int D, int Dv, int bk)
      : k(0),
        v(bk * D),
        q(v + bk * Dv),
        dout(q + kBQkv * odd_ld(D)),
        p(dout + kBQkv * odd_ld(Dv)),
        ds(p + bk * kBQkv),
        total(ds + bk * kBQkv) {}
};

// ---------------------------------------------------------------------------------------------
// Forward.
// Grid: 1-D, one block per (query tile of kBQ = 32 rows, b * H + h); within a head the last query
// tiles (the most keys under causality) are issued first.
// Block: 4 warps; warp w owns query rows [8w, 8w + 8) of the tile; lane c owns key column c of
// every key tile and output columns c, c + 32, ... (kVC of them) of its warp's rows.
// Tiles: Q (32 x D) stays in shared memory; per key tile (32 keys, memory tiles then current
// ones, only those in key_tiles()) K is loaded, S and the online-softmax update are formed in
// registers, P goes to shared memory, and V is loaded into K's buffer for O += P V.
// Masks: elementwise (causal, window, columns past a range end) only where
// query_owner_needs_mask(), or everywhere with padding or documents; query rows past N are computed on
// zeros and not written.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kVC>
__global__ void __launch_bounds__(kQWarps * kWarp) fwd_kernel(const Params<scalar_t> p) {
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const FwdSmem lay(p.D, p.Dv);
  acc_t* q_s = smem + lay.q;
  acc_t* kv_s = smem + lay.kv;
  acc_t* p_s = smem + lay.p;

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n_qt = tiles::ceil_div(p.N, kBQ);
  const int64_t bh = blockIdx.x / n_qt, qt = n_qt - 1 - blockIdx.x % n_qt;
  const int64_t b = bh / p.H;
  const int h = static_cast<int>(bh % p.H), hk = h / p.group;
  const int64_t i0 = qt * kBQ;
  const int bq = static_cast<int>(imin(kBQ, p.N - i0));
  const tiles::Geometry g = p.geometry();
  const acc_t slope = p.slopes ? p.slopes[h] : acc_t(0);
  const int k_ld = odd_ld(p.D);

  load_tile(q_s, p.D, p.q.row(b, h, i0), p.q.sl, p.q.sd, kBQ, bq, p.D);

  // l is kept per lane (each lane's share of the row sum) and reduced once at the end: the
  // rescale factor is uniform across the row, so the partial sums rescale consistently.
  acc_t m[kRows], l[kRows], o[kRows][kVC];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = neg_inf<acc_t>();
    l[r] = 0;
#pragma unroll
    for (int c = 0; c < kVC; ++c) o[r][c] = 0;
  }

  for (int seg = 0; seg < 2; ++seg) {
    const int64_t off = seg ? p.M : 0, len = seg ? p.N : p.M;
    const View4<const scalar_t> kx = seg ? p.k : p.mk;
    const View4<const scalar_t> vx = seg ? p.v : p.mv;
    const tiles::TileSpan span = tiles::key_tiles(g, i0, bq, off, len, kBK);
    for (int64_t t = span.first; t < span.last; ++t) {
      const int64_t a0 = off + t * kBK;
      const int bk = static_cast<int>(imin(kBK, off + len - a0));
      const bool masked = p.masks || tiles::query_owner_needs_mask(g, i0, bq, a0, bk, kBK);
      __syncthreads();  // the previous tile's V is no longer read
      load_tile(kv_s, k_ld, kx.row(b, hk, a0 - off), kx.sl, kx.sd, kBK, bk, p.D);
      __syncthreads();

      acc_t s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = 0;
      const acc_t* k_row = kv_s + lane * k_ld;
      const acc_t* q_rows = q_s + warp * kRows * p.D;
      for (int d = 0; d < p.D; ++d) {
        const acc_t kd = k_row[d];
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] += q_rows[r * p.D + d] * kd;
      }

      const int64_t j = a0 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + warp * kRows + r;
        acc_t t;
        acc_t x = p.logit(s[r], slope, i, j, &t);
        if (masked && !pair_seen(p, g, b, i, j, lane < bk)) x = neg_inf<acc_t>();
        const acc_t x_max = warp_max(x);
        const acc_t m_new = nan_max(m[r], x_max);
        // A row that has seen nothing yet (m_new = -inf) gets p = 0 and keeps o = l = 0,
        // instead of exp(-inf - -inf) = NaN.
        const acc_t m_use = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
        const acc_t pr = rows::exp_of(x - m_use);
        const acc_t alpha = rows::exp_of(m[r] - m_use);
        l[r] = l[r] * alpha + pr;
#pragma unroll
        for (int c = 0; c < kVC; ++c) o[r][c] *= alpha;
        m[r] = m_new;
        p_s[(warp * kRows + r) * kBK + lane] = pr;
      }

      __syncthreads();  // every warp is done with K
      load_tile(kv_s, p.Dv, vx.row(b, hk, a0 - off), vx.sl, vx.sd, kBK, bk, p.Dv);
      __syncthreads();

      for (int c = 0; c < bk; ++c) {
        acc_t v_c[kVC];
#pragma unroll
        for (int cc = 0; cc < kVC; ++cc) {
          const int col = lane + cc * kWarp;
          v_c[cc] = col < p.Dv ? kv_s[c * p.Dv + col] : acc_t(0);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const acc_t pr = p_s[(warp * kRows + r) * kBK + c];
#pragma unroll
          for (int cc = 0; cc < kVC; ++cc) o[r][cc] += pr * v_c[cc];
        }
      }
    }
  }

  const bool has_sink = p.sinks != nullptr;
  const acc_t sink = has_sink ? p.sinks[h] : acc_t(0);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + warp * kRows + r;
    const acc_t sum = warp_sum(l[r]);
    if (i >= p.N) continue;
    // A row that saw no key (masks, or queries placed before every key) gets 0 and LSE -inf (or the sink):
    // inv = 0 then, and its accumulator (0 * v, a NaN where v holds one) is not read.
    const rows::RowEnd<acc_t> end = rows::finish_row(m[r], sum, has_sink, sink);
    scalar_t* out_row = p.out.row(b, h, i);
#pragma unroll
    for (int cc = 0; cc < kVC; ++cc) {
      const int col = lane + cc * kWarp;
      if (col < p.Dv) out_row[col * p.out.sd] = static_cast<scalar_t>(end.inv == acc_t(0) ? acc_t(0) : o[r][cc] * end.inv);
    }
    if (lane == 0) p.lse[(b * p.H + h) * p.N + i] = end.lse;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dq pass.
// Grid, block and key-tile walk as the forward (one block per (query tile, b * H + h); warp w
// owns 8 query rows; lane c owns key column c and dq columns c, c + 32, ... (kDC of them)).
// Tiles: Q (32 x D) and dO (32 x Dv) stay in shared memory. Per key tile V is loaded first for
// dP = dO V^T, then K into the same buffer for S, P = exp(S - lse), dS = P (dP - delta), and
// dq += dS K, which keeps one key buffer. dS goes through shared memory (per warp).
// Masks: as the forward (query_owner_needs_mask); masked pairs get P = 0, hence dS = 0.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kDC>
__global__ void __launch_bounds__(kQWarps * kWarp) dq_kernel(const Params<scalar_t> p) {
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const DqSmem lay(p.D, p.Dv);
  acc_t* q_s = smem + lay.q;
  acc_t* do_s = smem + lay.dout;
  acc_t* kv_s = smem + lay.kv;
  acc_t* ds_s = smem + lay.ds;

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n_qt = tiles::ceil_div(p.N, kBQ);
  const int64_t bh = blockIdx.x / n_qt, qt = n_qt - 1 - blockIdx.x % n_qt;
  const int64_t b = bh / p.H;
  const int h = static_cast<int>(bh % p.H), hk = h / p.group;
  const int64_t i0 = qt * kBQ;
  const int bq = static_cast<int>(imin(kBQ, p.N - i0));
  const tiles::Geometry g = p.geometry();
  const acc_t slope = p.slopes ? p.slopes[h] : acc_t(0);
  const int k_ld = odd_ld(p.D), v_ld = odd_ld(p.Dv);

  load_tile(q_s, p.D, p.q.row(b, h, i0), p.q.sl, p.q.sd, kBQ, bq, p.D);
  load_tile(do_s, p.Dv, p.dout.row(b, h, i0), p.dout.sl, p.dout.sd, kBQ, bq, p.Dv);

  acc_t lse_r[kRows], delta_r[kRows], dq[kRows][kDC];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + warp * kRows + r;
    lse_r[r] = i < p.N ? p.lse[(b * p.H + h) * p.N + i] : acc_t(0);
    delta_r[r] = i < p.N ? p.delta[(b * p.H + h) * p.N + i] : acc_t(0);
#pragma unroll
    for (int c = 0; c < kDC; ++c) dq[r][c] = 0;
  }
  const acc_t* q_rows = q_s + warp * kRows * p.D;
  const acc_t* do_rows = do_s + warp * kRows * p.Dv;
  acc_t* ds_rows = ds_s + warp * kRows * kBK;

  for (int seg = 0; seg < 2; ++seg) {
    const int64_t off = seg ? p.M : 0, len = seg ? p.N : p.M;
    const View4<const scalar_t> kx = seg ? p.k : p.mk;
    const View4<const scalar_t> vx = seg ? p.v : p.mv;
    const tiles::TileSpan span = tiles::key_tiles(g, i0, bq, off, len, kBK);
    for (int64_t t = span.first; t < span.last; ++t) {
      const int64_t a0 = off + t * kBK;
      const int bk = static_cast<int>(imin(kBK, off + len - a0));
      const bool masked = p.masks || tiles::query_owner_needs_mask(g, i0, bq, a0, bk, kBK);

      __syncthreads();  // the previous tile's K is no longer read (Q, dO loads too, first time)
      load_tile(kv_s, v_ld, vx.row(b, hk, a0 - off), vx.sl, vx.sd, kBK, bk, p.Dv);
      __syncthreads();
      acc_t dp[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) dp[r] = 0;
      const acc_t* v_row = kv_s + lane * v_ld;
      for (int d = 0; d < p.Dv; ++d) {
        const acc_t vd = v_row[d];
#pragma unroll
        for (int r = 0; r < kRows; ++r) dp[r] += do_rows[r * p.Dv + d] * vd;
      }

      __syncthreads();  // every warp is done with V
      load_tile(kv_s, k_ld, kx.row(b, hk, a0 - off), kx.sl, kx.sd, kBK, bk, p.D);
      __syncthreads();
      acc_t s[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) s[r] = 0;
      const acc_t* k_row = kv_s + lane * k_ld;
      for (int d = 0; d < p.D; ++d) {
        const acc_t kd = k_row[d];
#pragma unroll
        for (int r = 0; r < kRows; ++r) s[r] += q_rows[r * p.D + d] * kd;
      }

      const int64_t j = a0 + lane;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + warp * kRows + r;
        acc_t t = 0;
        const acc_t x = p.logit(s[r], slope, i, j, &t);
        // Hidden pairs get exact zeros, not 0 * (dp - delta): a NaN row (NaN delta) must not reach
        // keys it does not see.
        const bool hidden = masked && !pair_seen(p, g, b, i, j, lane < bk);
        const acc_t pr = hidden ? acc_t(0) : prob(x - lse_r[r]);
        ds_rows[r * kBK + lane] = hidden ? acc_t(0) : pr * (dp[r] - delta_r[r]) * capped_slope(p, t);
      }
      __syncwarp();  // dS rows are private to the warp

      for (int c = 0; c < bk; ++c) {
        acc_t k_c[kDC];
#pragma unroll
        for (int cc = 0; cc < kDC; ++cc) {
          const int col = lane + cc * kWarp;
          k_c[cc] = col < p.D ? kv_s[c * k_ld + col] : acc_t(0);
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const acc_t ds = ds_rows[r * kBK + c];
#pragma unroll
          for (int cc = 0; cc < kDC; ++cc) dq[r][cc] += ds * k_c[cc];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + warp * kRows + r;
    if (i >= p.N) continue;
    scalar_t* dq_row = p.dq.row(b, h, i);
#pragma unroll
    for (int cc = 0; cc < kDC; ++cc) {
      const int col = lane + cc * kWarp;
      if (col < p.D) dq_row[col * p.dq.sd] = static_cast<scalar_t>(dq[r][cc] * p.scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, dk/dv pass.
// Grid: 1-D, one block per (key tile of kBKkv keys, b * Hkv + hk), kBKkv = 32 (16 for double);
// per kv head the memory tiles come first, then the current ones.
// Block: kBKkv / 4 warps; warp w owns key rows [4w, 4w + 4) of the tile; lane c owns query c of
// every query tile and gradient columns c, c + 32, ... (kC of them) of its warp's key rows.
// Tiles: K (kBKkv x D) and V (kBKkv x Dv) stay in shared memory. For each query head of the GQA
// group and each query tile of 32 that sees the key tile (query_tiles()), Q and dO are loaded, P^T
// and dS^T (key rows x queries) are formed in registers and passed through shared memory (per
// warp), and dv += P^T dO, dk += dS^T Q accumulate in registers: the group sum needs no atomics.
// Masks: elementwise only where key_owner_needs_mask(): causal, window, or queries past N (which
// would otherwise leak into valid keys), or everywhere with padding or documents; key rows past the range
// end are not written.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, int kC>
__global__ void __launch_bounds__(kv_warps<scalar_t>() * kWarp, kv_min_blocks<scalar_t>())
    dkdv_kernel(const Params<scalar_t> p) {
  constexpr int kBKkv = kv_warps<scalar_t>() * kKRows;
  using acc_t = at::acc_type<scalar_t, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const DkdvSmem lay(p.D, p.Dv, kBKkv);
  acc_t* k_s = smem + lay.k;
  acc_t* v_s = smem + lay.v;
  acc_t* q_s = smem + lay.q;
  acc_t* do_s = smem + lay.dout;
  acc_t* p_s = smem + lay.p;
  acc_t* ds_s = smem + lay.ds;

  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n_mt = tiles::ceil_div(p.M, kBKkv), n_kt = n_mt + tiles::ceil_div(p.N, kBKkv);
  const int64_t bhk = blockIdx.x / n_kt, kt = blockIdx.x % n_kt;
  const int64_t b = bhk / p.Hkv;
  const int hk = static_cast<int>(bhk % p.Hkv);
  const bool cur = kt >= n_mt;
  const int64_t off = cur ? p.M : 0, len = cur ? p.N : p.M;
  const int64_t a0 = off + (cur ? kt - n_mt : kt) * kBKkv;
  const int bk = static_cast<int>(imin(kBKkv, off + len - a0));
  const View4<const scalar_t> kx = cur ? p.k : p.mk;
  const View4<const scalar_t> vx = cur ? p.v : p.mv;
  const tiles::Geometry g = p.geometry();
  const int q_ld = odd_ld(p.D), do_ld = odd_ld(p.Dv);

  load_tile(k_s, p.D, kx.row(b, hk, a0 - off), kx.sl, kx.sd, kBKkv, bk, p.D);
  load_tile(v_s, p.Dv, vx.row(b, hk, a0 - off), vx.sl, vx.sd, kBKkv, bk, p.Dv);

  acc_t dk[kKRows][kC], dv[kKRows][kC];
#pragma unroll
  for (int r = 0; r < kKRows; ++r)
#pragma unroll
    for (int c = 0; c < kC; ++c) dk[r][c] = dv[r][c] = 0;

  const acc_t* k_rows = k_s + warp * kKRows * p.D;
  const acc_t* v_rows = v_s + warp * kKRows * p.Dv;
  acc_t* p_rows = p_s + warp * kKRows * kBQkv;
  acc_t* ds_rows = ds_s + warp * kKRows * kBQkv;
  const tiles::TileSpan span = tiles::query_tiles(g, a0, bk, kBQkv);

  for (int gi = 0; gi < p.group; ++gi) {
    const int h = hk * p.group + gi;
    const acc_t slope = p.slopes ? p.slopes[h] : acc_t(0);
    for (int64_t qt = span.first; qt < span.last; ++qt) {
      const int64_t i0 = qt * kBQkv;
      const int bq = static_cast<int>(imin(kBQkv, p.N - i0));
      const bool masked = p.masks || tiles::key_owner_needs_mask(g, i0, bq, kBQkv, a0, bk);
      const int64_t i = i0 + lane;
      const acc_t lse_i = lane < bq ? p.lse[(b * p.H + h) * p.N + i] : acc_t(0);
      const acc_t delta_i = lane < bq ? p.delta[(b * p.H + h) * p.N + i] : acc_t(0);

      __syncthreads();  // the previous query tile is no longer read (K, V loads too, first time)
      load_tile(q_s, q_ld, p.q.row(b, h, i0), p.q.sl, p.q.sd, kBQkv, bq, p.D);
      load_tile(do_s, do_ld, p.dout.row(b, h, i0), p.dout.sl, p.dout.sd, kBQkv, bq, p.Dv);
      __syncthreads();

      acc_t s[kKRows], dp[kKRows];
#pragma unroll
      for (int r = 0; r < kKRows; ++r) s[r] = dp[r] = 0;
      const acc_t* q_row = q_s + lane * q_ld;
      for (int d = 0; d < p.D; ++d) {
        const acc_t qd = q_row[d];
#pragma unroll
        for (int r = 0; r < kKRows; ++r) s[r] += k_rows[r * p.D + d] * qd;
      }
      const acc_t* do_row = do_s + lane * do_ld;
      for (int d = 0; d < p.Dv; ++d) {
        const acc_t od = do_row[d];
#pragma unroll
        for (int r = 0; r < kKRows; ++r) dp[r] += v_rows[r * p.Dv + d] * od;
      }

#pragma unroll
      for (int r = 0; r < kKRows; ++r) {
        const int64_t j = a0 + warp * kKRows + r;
        acc_t t = 0;
        const acc_t x = p.logit(s[r], slope, i, j, &t);
        // Exact zeros, as in dq. Key rows past the tile (r >= bk) are never written, masked or not.
        const bool hidden = masked && !pair_seen(p, g, b, i, j, lane < bq);
        const acc_t pr = hidden ? acc_t(0) : prob(x - lse_i);
        p_rows[r * kBQkv + lane] = pr;
        ds_rows[r * kBQkv + lane] = hidden ? acc_t(0) : pr * (dp[r] - delta_i) * capped_slope(p, t);
      }
      __syncwarp();  // P^T and dS^T rows are private to the warp

      for (int c = 0; c < bq; ++c) {
        acc_t q_c[kC], do_c[kC];
#pragma unroll
        for (int cc = 0; cc < kC; ++cc) {
          const int col = lane + cc * kWarp;
          q_c[cc] = col < p.D ? q_s[c * q_ld + col] : acc_t(0);
          do_c[cc] = col < p.Dv ? do_s[c * do_ld + col] : acc_t(0);
        }
#pragma unroll
        for (int r = 0; r < kKRows; ++r) {
          const acc_t pr = p_rows[r * kBQkv + c], ds = ds_rows[r * kBQkv + c];
#pragma unroll
          for (int cc = 0; cc < kC; ++cc) {
            dv[r][cc] += pr * do_c[cc];
            dk[r][cc] += ds * q_c[cc];
          }
        }
      }
    }
  }

  const View4<scalar_t> dkx = cur ? p.dk : p.dmk;
  const View4<scalar_t> dvx = cur ? p.dv : p.dmv;
#pragma unroll
  for (int r = 0; r < kKRows; ++r) {
    const int row = warp * kKRows + r;
    if (row >= bk) continue;
    scalar_t* dk_row = dkx.row(b, hk, a0 - off + row);
    scalar_t* dv_row = dvx.row(b, hk, a0 - off + row);
#pragma unroll
    for (int cc = 0; cc < kC; ++cc) {
      const int col = lane + cc * kWarp;
      if (col < p.D) dk_row[col * dkx.sd] = static_cast<scalar_t>(dk[r][cc] * p.scale);
      if (col < p.Dv) dv_row[col * dvx.sd] = static_cast<scalar_t>(dv[r][cc]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

// Register arrays are sized at compile time: per-lane column chunks of 32 for a head dim <= 64,
// 128 or 256 (three instantiations per kernel and dtype instead of one per head dim).
template <typename F>
void with_chunks(int64_t dim, F&& f) {
  if (dim <= 64) {
    f(std::integral_constant<int, 2>{});
  } else if (dim <= 128) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

template <typename Kernel, typename P>
void launch(Kernel kernel, int64_t blocks, int threads, int64_t smem_bytes, const P& params, int device) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= INT_MAX, "memory_attention (CUDA): ", blocks, " thread blocks exceed the grid limit");
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem_bytes <= optin, "memory_attention (CUDA): head dims D=", params.D, ", Dv=", params.Dv,
              " need ", smem_bytes, " bytes of shared memory per block in this dtype; this GPU allows ", optin);
  // Above 48 KiB a kernel must opt in to dynamic shared memory.
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, at::cuda::getCurrentCUDAStream(device)>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The shared checks (common/op_checks.h), then what these kernels add: CUDA tensors, head dims their
// register tiles hold, int32 lengths. The window in the result is the one the kernels use (0 for one that hides
// nothing), Q0 the position of query 0 (q_offset: a ring step's block pair, where rows may see no key).
checks::MemoryAttentionDims check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& mem_k, const Tensor& mem_v,
                                         const std::optional<Tensor>& alibi, int64_t window,
                                         std::optional<int64_t> q_offset) {
  const auto d = checks::memory_attention(op, q, k, v, mem_k, mem_v, alibi, window, q_offset);
  TORCH_CHECK(q.is_cuda(), op, " (CUDA): tensors must be on a CUDA device, got ", q.device());
  TORCH_CHECK(d.D <= kMaxHeadDim && d.Dv <= kMaxHeadDim, op, " (CUDA): head dims must be in [1, ", kMaxHeadDim,
              "], got D=", d.D, ", Dv=", d.Dv);
  TORCH_CHECK(d.N <= INT_MAX && d.M <= INT_MAX, op, " (CUDA): lengths beyond int32 are not supported");
  return d;
}

// The options of docs/semantics.md §1 beyond window and ALiBi, in the form the kernels read: the padding mask
// as given (bool, own strides), document ids as contiguous int64, sinks in the accumulation type.
struct MaskArgs {
  Tensor pad, doc, sinks;
  double softcap = 0.0;
};

MaskArgs mask_args(const char* op, const checks::MemoryAttentionDims& d, const Tensor& q,
                   const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& document_ids,
                   double softcap, const std::optional<Tensor>* sinks) {
  checks::memory_attention_masks(op, d, q.device(), key_padding_mask, document_ids, softcap, sinks);
  MaskArgs a;
  if (key_padding_mask.has_value()) a.pad = *key_padding_mask;
  if (document_ids.has_value()) a.doc = document_ids->to(at::kLong).contiguous();
  if (sinks != nullptr && sinks->has_value()) a.sinks = (*sinks)->to(acc_dtype(q.scalar_type())).contiguous();
  a.softcap = softcap;
  return a;
}

template <typename scalar_t>
Params<scalar_t> make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k,
                             const Tensor& mem_v, const Tensor& slopes, bool causal,
                             const checks::MemoryAttentionDims& dims, double scale, const MaskArgs& masks) {
  using acc_t = typename Params<scalar_t>::acc_t;
  Params<scalar_t> p{};
  p.q = view4<const scalar_t>(q);
  p.k = view4<const scalar_t>(k);
  p.v = view4<const scalar_t>(v);
  p.mk = view4<const scalar_t>(mem_k);
  p.mv = view4<const scalar_t>(mem_v);
  p.slopes = slopes.defined() ? slopes.data_ptr<acc_t>() : nullptr;
  p.H = static_cast<int>(q.size(1));
  p.Hkv = static_cast<int>(k.size(1));
  p.group = p.H / p.Hkv;
  p.D = static_cast<int>(q.size(3));
  p.Dv = static_cast<int>(v.size(3));
  p.N = q.size(2);
  p.M = mem_k.size(2);
  p.Q0 = dims.Q0;
  p.window = dims.window;
  p.causal = causal;
  p.scale = static_cast<acc_t>(scale);
  p.cap = static_cast<acc_t>(masks.softcap);
  p.cap_inner = masks.softcap != 0.0 ? static_cast<acc_t>(scale / masks.softcap) : acc_t(0);
  p.sinks = masks.sinks.defined() ? masks.sinks.data_ptr<acc_t>() : nullptr;
  if (masks.pad.defined()) {
    p.pad = masks.pad.const_data_ptr<bool>();
    p.pad_sb = masks.pad.stride(0);
    p.pad_sl = masks.pad.stride(1);
  }
  if (masks.doc.defined()) {
    p.doc = masks.doc.const_data_ptr<int64_t>();
    p.doc_sb = masks.doc.stride(0);
  }
  p.masks = p.pad != nullptr || p.doc != nullptr;
  return p;
}

Tensor slopes_for(const std::optional<Tensor>& alibi, const Tensor& q, at::ScalarType acc) {
  if (!alibi.has_value()) return Tensor();
  return alibi->to(acc).contiguous();
}

std::tuple<Tensor, Tensor> memory_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k,
                                                const Tensor& mem_v, const std::optional<Tensor>& alibi_slopes,
                                                bool causal, int64_t window, double scale,
                                                const std::optional<Tensor>& key_padding_mask,
                                                const std::optional<Tensor>& document_ids, double softcap,
                                                const std::optional<Tensor>& sinks, std::optional<int64_t> q_offset) {
  const auto dims = check_inputs("memory_attention_fwd", q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset);
  const MaskArgs masks = mask_args("memory_attention_fwd", dims, q, key_padding_mask, document_ids, softcap, &sinks);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Dv = v.size(3);
  const auto acc = acc_dtype(q.scalar_type());
  const Tensor slopes = slopes_for(alibi_slopes, q, acc);
  Tensor out = at::empty({B, H, N, Dv}, q.options());
  Tensor lse = at::empty({B, H, N}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "memory_attention_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Params<scalar_t> p = make_params<scalar_t>(q, k, v, mem_k, mem_v, slopes, causal, dims, scale, masks);
    p.out = view4<scalar_t>(out);
    p.lse = lse.data_ptr<acc_t>();
    const int64_t blocks = tiles::ceil_div(N, kBQ) * B * H;
    const int64_t smem = int64_t(FwdSmem(p.D, p.Dv).total) * sizeof(acc_t);
    with_chunks(Dv, [&](auto vc) {
      launch(fwd_kernel<scalar_t, decltype(vc)::value>, blocks, kQWarps * kWarp, smem, p, q.get_device());
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> memory_attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mem_k, const Tensor& mem_v,
    const std::optional<Tensor>& alibi_slopes, const Tensor& lse, const Tensor& delta, bool causal, int64_t window,
    double scale, const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& document_ids,
    double softcap, std::optional<int64_t> q_offset) {
  const auto dims = check_inputs("memory_attention_bwd", q, k, v, mem_k, mem_v, alibi_slopes, window, q_offset);
  checks::memory_attention_grads("memory_attention_bwd", dims, q, dout, lse, delta);
  const MaskArgs masks = mask_args("memory_attention_bwd", dims, q, key_padding_mask, document_ids, softcap, nullptr);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), Hkv = k.size(1), M = mem_k.size(2);
  const auto acc = acc_dtype(q.scalar_type());
  const Tensor slopes = slopes_for(alibi_slopes, q, acc);
  // (B, H, N) each: small enough to normalise; the big tensors are read in place.
  const Tensor lse_c = lse.to(acc).contiguous(), delta_c = delta.to(acc).contiguous();
  const Tensor dout_c = dout.to(q.scalar_type());
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  Tensor dmk = at::empty(mem_k.sizes(), mem_k.options()), dmv = at::empty(mem_v.sizes(), mem_v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "memory_attention_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    Params<scalar_t> p = make_params<scalar_t>(q, k, v, mem_k, mem_v, slopes, causal, dims, scale, masks);
    p.dout = view4<const scalar_t>(dout_c);
    p.lse = lse_c.data_ptr<acc_t>();  // read only in the backward kernels
    p.delta = delta_c.data_ptr<acc_t>();
    p.dq = view4<scalar_t>(dq);
    p.dk = view4<scalar_t>(dk);
    p.dv = view4<scalar_t>(dv);
    p.dmk = view4<scalar_t>(dmk);
    p.dmv = view4<scalar_t>(dmv);
    const int device = q.get_device();

    // Every key row gets a block (zeros where no query sees it), so dk/dv need no zero-fill.
    constexpr int kBKkv = kv_warps<scalar_t>() * kKRows;
    const int64_t kv_blocks = (tiles::ceil_div(M, kBKkv) + tiles::ceil_div(N, kBKkv)) * B * Hkv;
    const int64_t kv_smem = int64_t(DkdvSmem(p.D, p.Dv, kBKkv).total) * sizeof(acc_t);
    with_chunks(std::max(p.D, p.Dv), [&](auto c) {
      launch(dkdv_kernel<scalar_t, decltype(c)::value>, kv_blocks, kv_warps<scalar_t>() * kWarp, kv_smem, p, device);
    });

    const int64_t q_blocks = tiles::ceil_div(N, kBQ) * B * H;
    const int64_t q_smem = int64_t(DqSmem(p.D, p.Dv).total) * sizeof(acc_t);
    with_chunks(p.D, [&](auto dc) {
      launch(dq_kernel<scalar_t, decltype(dc)::value>, q_blocks, kQWarps * kWarp, q_smem, p, device);
    });
  });
  return {dq, dk, dv, dmk, dmv};
}

}  // namespace

TORCH_LIBRARY_IMPL(longkernels, CUDA, m) {
  m.impl("memory_attention_fwd", &memory_attention_fwd);
  m.impl("memory_attention_bwd", &memory_attention_bwd);
}

}  // namespace longkernels::gpu
