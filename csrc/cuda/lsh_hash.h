#pragma once
// The bucket arithmetic of the CUDA hash (lsh_attention.cu), host-includable so that it is tested on a
// machine without a GPU (csrc/tests/test_cuda_host_logic.cpp): the running argmax of torch.argmax and the
// fold of factorised buckets (docs/semantics.md §2).
#include "common/memory_attention_tiles.h"  // LK_HD

namespace longkernels::lsh {

// Factors are even, >= 2, their product below 2^31: at most 30 of them.
constexpr int kMaxFactors = 32;

// Running argmax in scan order with the first index kept on ties (strict >), as torch.argmax:
// a NaN counts as the largest value, so the first NaN wins (without NaNs: plain strict >).
// `v != v` is the NaN test; nvcc's --use_fast_math does not assume finite values.
struct ArgmaxFirst {
  float best = 0.0f;
  int index = -1;  // -1: nothing offered yet
  LK_HD void offer(float v, int i) {
    const bool best_is_nan = best != best;
    if (index < 0 || (!best_is_nan && (v > best || v != v))) {
      best = v;
      index = i;
    }
  }
};

// The bucket of argmax([y_0 .. y_{K-1}, -y_0 .. -y_{K-1}]) from the two halves' running argmaxes
// (pos offered y_k with index k, neg offered -y_k with index K + k, each in increasing k).
// Equal to one scan over the concatenation: after the first half the state is `pos`, and the
// second half then replaces it only by its own first maximum, and only if that beats pos strictly
// (or is the first NaN where pos has none).
LK_HD int bucket_of(ArgmaxFirst pos, const ArgmaxFirst& neg) {
  pos.offer(neg.best, neg.index);
  return pos.index;
}

// Factorised buckets: factor i (n_i = 2 K_i buckets) hashed alone gives b_i in [0, n_i); the bucket is
// b_1 + n_1 b_2 + n_1 n_2 b_3 + ... (trax's and HF's order). One factor: b_1 itself.
struct FactorFold {
  int bucket = 0, weight = 1;
  LK_HD void add(int b, int K) {
    bucket += weight * b;
    weight *= 2 * K;
  }
};

}  // namespace longkernels::lsh
