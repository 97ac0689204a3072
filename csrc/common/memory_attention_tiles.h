#pragma once
// Tile arithmetic of memory attention, shared by the CPU and CUDA kernels (and their tests).
//
// Query i sits at absolute position Q0 + i (Q0 = M unless a caller places the queries elsewhere, as a
// ring step does for a block pair), key j at position j (memory first, keys [0, M + N)). Query i sees
// key j iff (!causal || j <= Q0 + i) && (window == 0 || j > Q0 + i - window). For a block of queries
// the union of visible keys is one interval, and so is the union of queries seeing a block of keys.
#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace longkernels::tiles {

struct Geometry {
  int64_t N, M;
  int64_t Q0;  // position of query 0 (M for memory attention)
  bool causal;
  int64_t window;  // 0: none
};

struct Range {
  int64_t lo, hi;  // half-open, absolute positions (keys) or query indices (queries)
};

LK_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Keys visible to at least one of the queries [i0, i0 + bq).
LK_HD Range visible_keys(const Geometry& g, int64_t i0, int64_t bq) {
  const int64_t lo = g.window ? clamp64(g.Q0 + i0 - g.window + 1, 0, g.M + g.N) : 0;
  const int64_t hi = g.causal ? clamp64(g.Q0 + i0 + bq, 0, g.M + g.N) : g.M + g.N;
  return {lo, hi < lo ? lo : hi};
}

// Queries that see at least one of the keys [a0, a0 + bk).
LK_HD Range visible_queries(const Geometry& g, int64_t a0, int64_t bk) {
  const int64_t lo = g.causal ? clamp64(a0 - g.Q0, 0, g.N) : 0;
  const int64_t hi = g.window ? clamp64(a0 + bk - 1 + g.window - g.Q0, 0, g.N) : g.N;
  return {lo, hi < lo ? lo : hi};
}

// Whether every query of [i0, i0 + bq) sees every key of [a0, a0 + bk): no mask needed.
LK_HD bool tile_fully_visible(const Geometry& g, int64_t i0, int64_t bq, int64_t a0, int64_t bk) {
  const bool causal_ok = !g.causal || a0 + bk - 1 <= g.Q0 + i0;
  const bool window_ok = !g.window || a0 > g.Q0 + i0 + bq - 1 - g.window;
  return causal_ok && window_ok;
}

// Columns [c0, c1) of the key tile starting at a0 (width bk) that query i sees.
LK_HD void row_columns(const Geometry& g, int64_t i, int64_t a0, int64_t bk, int64_t* c0, int64_t* c1) {
  const int64_t qpos = g.Q0 + i;
  const int64_t hi = g.causal ? clamp64(qpos - a0 + 1, 0, bk) : bk;
  const int64_t lo = g.window ? clamp64(qpos - g.window + 1 - a0, 0, bk) : 0;
  *c0 = lo;
  *c1 = hi < lo ? lo : hi;
}

}  // namespace longkernels::tiles
