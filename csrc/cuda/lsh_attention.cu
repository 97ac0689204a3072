// LSH attention on CUDA: the fused hash-and-sort step, lsh_hash_sort (docs/semantics.md §2).
//
// Grid: 1-D, one block per (batch, head, round), blockIdx.x = (b * H + h) * n_hashes + r, which is
// also the row of the (B, H, n_hashes, Lp) outputs the block owns. A round's permutation is a sort
// of Lp small integer keys (bucket in [0, n_buckets]), so one block does it all: a counting sort,
// O(Lp + n_buckets), with no second kernel, no global synchronisation and no atomics in global
// memory (except in the large-n_buckets fallback, where the counters themselves live there).
// Block: kThreads = 512 (16 warps). Tokens are taken in tiles of kThreads in position order,
// thread t owning position tile * kThreads + t in every phase, so a thread reads back only the
// buckets it wrote itself.
//
//   1. Hash (fused): each thread hashes its token, y_k = sum_d x_d R[h, d, r, k] with float32
//      accumulators for kKC values of k at a time (x re-read per group, from cache), R read from
//      global memory at an address independent of the token, so the 32 lanes of a warp read the
//      same R element (one broadcast transaction; 16-byte vector loads when aligned). The bucket is
//      the argmax over [y, -y], first index on ties (lsh::ArgmaxFirst, cuda/lsh_hash.h); with factorised
//      buckets n_1 x n_2 x ..., factor i takes its own block of n_i / 2 columns and the buckets combine
//      as b_1 + n_1 b_2 + n_1 n_2 b_3 + ... (lsh::FactorFold); padding (position >= L or
//      key_padding_mask) gets n_buckets. Buckets go straight to the output, and into a histogram
//      of n_buckets + 1 counters: lanes with equal buckets are grouped with __match_any_sync and
//      the group's lowest lane adds the group size, one atomic per distinct bucket per warp.
//   2. Exclusive scan of the counters: thread t scans a contiguous segment of them, the segment
//      totals are scanned across the block (warp shuffles, then the 16 warp totals).
//   3. Stable scatter: per tile, warps in turn (a __syncthreads after each), so tokens are placed in
//      position order. Within a warp, __match_any_sync gives the lanes sharing a bucket, a lane's
//      rank among them is __popc(peers & lanemask_lt); all read the bucket's cursor, __syncwarp,
//      write perm[cursor + rank], and the lowest lane advances the cursor by the group size.
//      The counters of phase 2 are reused as the cursors.
//
// Shared memory: (n_buckets + 1 + 32) ints, the counters and the scan's warp totals. When that
// exceeds kMaxSharedBytes (48 KiB, what every block gets without opting in, i.e. n_buckets above
// about 12k), the counters move to a global scratch array, (n_buckets + 1) ints per block,
// allocated by the host and zeroed by the kernel; the code is the same (templated on where the
// counters live), __syncthreads orders global memory within the block just as it does shared.
//
// Why this shape: the sort is by small keys, so counting sort is exact, stable and linear; the
// per-round block keeps everything (histogram, cursors) block-local and the result deterministic.
// The serial walk over warps in phase 3 costs one barrier per 32 tokens, cheap next to the hash
// (Lp * D * K multiply-adds per block, K = n_buckets / 2 columns, or sum(n_i / 2) factorised).

// c10/cuda headers only, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE headers,
// and this file must also compile (.ci/compile_cuda.sh) with a bare toolkit and a CPU torch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/op_checks.h"
#include "cuda/lsh_hash.h"

namespace longkernels::gpu {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFull = 0xffffffffu;
// y_k accumulated kKC at a time: x is re-read once per group of kKC rotations.
constexpr int kKC = 8;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename scalar_t>
struct HashSortParams {
  const scalar_t* qk;  // (B, H, L, D), own strides
  int64_t q_sb, q_sh, q_sl, q_sd;
  const float* rot;  // (H, D, n_hashes, K) contiguous
  const bool* mask;  // (B, L) or nullptr
  int64_t m_sb, m_sl;
  int32_t* buckets;  // (B, H, n_hashes, Lp) contiguous
  int32_t* perm;     // (B, H, n_hashes, Lp) contiguous
  int32_t* scratch;  // global counters, (n_blocks, n_buckets + 1), or nullptr: shared memory
  int H, D, n_hashes, K, n_buckets, L, Lp;
  // The rotation columns of each factor (n_i / 2; one factor n_buckets / 2 without factorisation).
  int n_factors;
  int half[lsh::kMaxFactors];
};

// The bucket in [0, 2K) of one token under one block of K rotation columns: x = qk[b, h, p, :] (stride
// sd), rot = &R[h, 0, r, c0] (stride rot_sd between consecutive d), the argmax over [y, -y]. The R address
// does not depend on the token: a warp's lanes read the same element. kVec: R rows are 16-byte aligned and
// K % 4 == 0 (and c0 % 4 == 0), so groups of 4 load as one float4.
template <bool kVec, typename scalar_t>
__device__ __forceinline__ int hash_block(const scalar_t* __restrict__ x, int64_t sd, const float* __restrict__ rot,
                                          int64_t rot_sd, int D, int K) {
  lsh::ArgmaxFirst pos, neg;
  for (int k0 = 0; k0 < K; k0 += kKC) {
    float y[kKC];
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) y[kk] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float xd = static_cast<float>(x[d * sd]);
      const float* rd = rot + d * rot_sd + k0;
      if constexpr (kVec) {
#pragma unroll
        for (int v = 0; v < kKC / 4; ++v) {
          if (k0 + 4 * v < K) {
            const float4 r4 = __ldg(reinterpret_cast<const float4*>(rd) + v);
            y[4 * v + 0] += xd * r4.x;
            y[4 * v + 1] += xd * r4.y;
            y[4 * v + 2] += xd * r4.z;
            y[4 * v + 3] += xd * r4.w;
          }
        }
      } else {
#pragma unroll
        for (int kk = 0; kk < kKC; ++kk)
          if (k0 + kk < K) y[kk] += xd * __ldg(rd + kk);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) {
      if (k0 + kk < K) {
        pos.offer(y[kk], k0 + kk);
        neg.offer(-y[kk], K + k0 + kk);
      }
    }
  }
  return lsh::bucket_of(pos, neg);
}

// Bucket of one token: factor f hashes with its own block of half[f] columns (hash_block), and the
// buckets combine as b_1 + n_1 b_2 + n_1 n_2 b_3 + ... (lsh::FactorFold); one factor is plain hashing.
template <bool kVec, typename scalar_t>
__device__ __forceinline__ int hash_token(const scalar_t* __restrict__ x, int64_t sd, const float* __restrict__ rot_hr,
                                          int64_t rot_sd, int D, const int* half, int n_factors) {
  lsh::FactorFold fold;
  int c0 = 0;
  for (int f = 0; f < n_factors; ++f) {
    fold.add(hash_block<kVec>(x, sd, rot_hr + c0, rot_sd, D, half[f]), half[f]);
    c0 += half[f];
  }
  return fold.bucket;
}

// ---------------------------------------------------------------------------------------------
// Hash and sort, one block per (b, h, r); phases as in the header comment.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, bool kSharedCounters, bool kVec>
__global__ void __launch_bounds__(kThreads) hash_sort_kernel(const HashSortParams<scalar_t> p) {
  extern __shared__ int smem_i[];
  int* warp_tot = smem_i;  // kWarps ints (scan)
  const int n_cnt = p.n_buckets + 1;
  int* cnt = kSharedCounters ? smem_i + kWarp : p.scratch + int64_t(blockIdx.x) * n_cnt;

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const unsigned lanemask_lt = (1u << lane) - 1u;
  const int64_t blk = blockIdx.x;
  const int r = static_cast<int>(blk % p.n_hashes);
  const int64_t bh = blk / p.n_hashes;
  const int h = static_cast<int>(bh % p.H);
  const int64_t b = bh / p.H;
  int32_t* buckets = p.buckets + blk * p.Lp;
  int32_t* perm = p.perm + blk * p.Lp;
  const scalar_t* x_bh = p.qk + b * p.q_sb + h * p.q_sh;
  const int64_t rot_sd = int64_t(p.n_hashes) * p.K;
  const float* rot_hr = p.rot + (int64_t(h) * p.D * p.n_hashes + r) * p.K;

  for (int i = tid; i < n_cnt; i += kThreads) cnt[i] = 0;
  __syncthreads();

  // 1. Hash and histogram. The loop bound is uniform, so every lane reaches __match_any_sync.
  for (int base = 0; base < p.Lp; base += kThreads) {
    const int pos = base + tid;
    const bool valid = pos < p.Lp;
    int bucket = -1;  // lanes past Lp: a value no valid lane has
    if (valid) {
      const bool pad = pos >= p.L || (p.mask != nullptr && p.mask[b * p.m_sb + int64_t(pos) * p.m_sl]);
      bucket = pad ? p.n_buckets
                   : hash_token<kVec>(x_bh + int64_t(pos) * p.q_sl, p.q_sd, rot_hr, rot_sd, p.D, p.half, p.n_factors);
      buckets[pos] = bucket;
    }
    const unsigned peers = __match_any_sync(kFull, bucket);
    if (valid && (peers & lanemask_lt) == 0) atomicAdd(&cnt[bucket], __popc(peers));
  }
  __syncthreads();

  // 2. Exclusive scan of cnt[0, n_cnt): thread t owns the segment [lo, hi).
  {
    const int per = (n_cnt + kThreads - 1) / kThreads;
    const int lo = min(n_cnt, tid * per), hi = min(n_cnt, lo + per);
    int sum = 0;
    for (int i = lo; i < hi; ++i) sum += cnt[i];
    int incl = sum;  // inclusive scan of the segment sums within the warp
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const int y = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == kWarp - 1) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      const int t = lane < kWarps ? warp_tot[lane] : 0;
      int s = t;
#pragma unroll
      for (int o = 1; o < kWarp; o *= 2) {
        const int y = __shfl_up_sync(kFull, s, o);
        if (lane >= o) s += y;
      }
      if (lane < kWarps) warp_tot[lane] = s - t;  // exclusive
    }
    __syncthreads();
    int run = warp_tot[warp] + incl - sum;
    for (int i = lo; i < hi; ++i) {
      const int c = cnt[i];
      cnt[i] = run;
      run += c;
    }
  }
  __syncthreads();

  // 3. Stable scatter: tiles in position order, warps in turn, lanes ranked within bucket groups.
  for (int base = 0; base < p.Lp; base += kThreads) {
    const int pos = base + tid;
    const bool valid = pos < p.Lp;
    const int bucket = valid ? buckets[pos] : -1;  // written by this thread in phase 1
    for (int w = 0; w < kWarps; ++w) {
      if (base + w * kWarp >= p.Lp) break;  // uniform: the rest of the tile is past Lp
      if (warp == w) {
        const unsigned peers = __match_any_sync(kFull, bucket);
        const int rank = __popc(peers & lanemask_lt);
        const int start = valid ? cnt[bucket] : 0;
        __syncwarp();  // every peer has read the cursor before the leader moves it
        if (valid) {
          perm[start + rank] = pos;
          if (rank == 0) cnt[bucket] = start + __popc(peers);
        }
      }
      __syncthreads();  // the next warp sees the advanced cursors
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> lsh_hash_sort(const Tensor& qk, const Tensor& rotations,
                                         const std::optional<Tensor>& key_padding_mask, int64_t n_buckets,
                                         int64_t padded_len, at::OptionalIntArrayRef bucket_factors) {
  checks::lsh_hash_sort("lsh_hash_sort", qk, rotations, key_padding_mask, n_buckets, padded_len, bucket_factors);
  // Each factor >= 2 and their product < 2^31 (checked above) allow at most 30 of them.
  TORCH_CHECK(!bucket_factors.has_value() || bucket_factors->size() <= size_t(lsh::kMaxFactors),
              "lsh_hash_sort (CUDA): at most ", lsh::kMaxFactors, " bucket factors");
  TORCH_CHECK(qk.is_cuda(), "lsh_hash_sort (CUDA): qk must be a CUDA tensor");
  TORCH_CHECK(rotations.scalar_type() == at::kFloat, "lsh_hash_sort (CUDA): rotations must be float32");
  TORCH_CHECK(padded_len < INT_MAX - kThreads, "lsh_hash_sort (CUDA): padded_len must fit in int32, got ", padded_len);
  const int64_t B = qk.size(0), H = qk.size(1), L = qk.size(2), D = qk.size(3);
  const c10::cuda::CUDAGuard guard(qk.device());
  const int64_t n_hashes = rotations.size(2);
  const int64_t n_blocks = B * H * n_hashes;
  const auto i32 = qk.options().dtype(at::kInt);
  Tensor buckets = at::empty({B, H, n_hashes, padded_len}, i32);
  Tensor perm = at::empty({B, H, n_hashes, padded_len}, i32);
  if (n_blocks == 0 || padded_len == 0) return {buckets, perm};
  TORCH_CHECK(n_blocks <= INT_MAX, "lsh_hash_sort (CUDA): ", n_blocks, " thread blocks exceed the grid limit");

  const Tensor rot = rotations.contiguous();
  const int64_t K = rotations.size(3);  // n_buckets / 2, or the factors' sum of n_i / 2
  std::vector<int> half;
  if (bucket_factors.has_value() && !bucket_factors->empty()) {
    for (const int64_t f : *bucket_factors) half.push_back(static_cast<int>(f / 2));
  } else {
    half.push_back(static_cast<int>(n_buckets / 2));
  }
  // float4 loads of R: every (h, d, r) row and every factor's block start 16-byte aligned.
  bool vec = reinterpret_cast<uintptr_t>(rot.data_ptr()) % 16 == 0;
  for (const int c : half) vec = vec && c % 4 == 0;
  const int64_t shared_bytes = (kWarp + n_buckets + 1) * int64_t(sizeof(int));
  const bool shared_counters = shared_bytes <= kMaxSharedBytes;
  Tensor scratch;
  if (!shared_counters) scratch = at::empty({n_blocks, n_buckets + 1}, i32);
  const int64_t smem = shared_counters ? shared_bytes : kWarp * int64_t(sizeof(int));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(qk.get_device()).stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "lsh_hash_sort_cuda", [&] {
    HashSortParams<scalar_t> p{};
    p.qk = qk.const_data_ptr<scalar_t>();
    p.q_sb = qk.stride(0);
    p.q_sh = qk.stride(1);
    p.q_sl = qk.stride(2);
    p.q_sd = qk.stride(3);
    p.rot = rot.const_data_ptr<float>();
    if (key_padding_mask.has_value()) {
      p.mask = key_padding_mask->const_data_ptr<bool>();
      p.m_sb = key_padding_mask->stride(0);
      p.m_sl = key_padding_mask->stride(1);
    }
    p.buckets = buckets.data_ptr<int32_t>();
    p.perm = perm.data_ptr<int32_t>();
    p.scratch = shared_counters ? nullptr : scratch.data_ptr<int32_t>();
    p.H = static_cast<int>(H);
    p.D = static_cast<int>(D);
    p.n_hashes = static_cast<int>(n_hashes);
    p.K = static_cast<int>(K);
    p.n_factors = static_cast<int>(half.size());
    for (size_t f = 0; f < half.size(); ++f) p.half[f] = half[f];
    p.n_buckets = static_cast<int>(n_buckets);
    p.L = static_cast<int>(L);
    p.Lp = static_cast<int>(padded_len);
    auto go = [&](auto shared_c, auto vec_c) {
      hash_sort_kernel<scalar_t, decltype(shared_c)::value, decltype(vec_c)::value>
          <<<static_cast<unsigned>(n_blocks), kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using T = std::true_type;
    using F = std::false_type;
    if (shared_counters) {
      vec ? go(T{}, T{}) : go(T{}, F{});
    } else {
      vec ? go(F{}, T{}) : go(F{}, F{});
    }
  });
  return {buckets, perm};
}

}  // namespace

TORCH_LIBRARY_IMPL(longkernels, CUDA, m) { m.impl("lsh_hash_sort", &lsh_hash_sort); }

}  // namespace longkernels::gpu
