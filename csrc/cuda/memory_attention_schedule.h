#pragma once
// Tile schedule of the CUDA memory-attention kernels, on top of the shared interval arithmetic in
// common/memory_attention_tiles.h. Host-includable (plain C++ sees inline functions), so the
// schedule can be checked exhaustively on a machine without a GPU.
//
// Key tiles are aligned to the start of their segment (memory [0, M), current [M, M + N)), never
// straddle the two, and have width BK except the last of each segment. Query tiles are aligned to
// 0 with height BQ except the last. The forward and dq kernels own query tiles and walk key tiles;
// the dk/dv kernel owns a key tile and walks query tiles. A visited tile is "masked" when some pair
// in it must be hidden: by causality, by the window, or because the tile is cut short by the end of
// its segment (an owned short dimension needs no mask: its rows are simply not written).
#include "common/memory_attention_tiles.h"

namespace longkernels::tiles {

// Half-open range of tile indices.
struct TileSpan {
  int64_t first, last;
};

LK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether query i (at position Q0 + i) sees key j (absolute position), the reference mask itself.
LK_HD bool visible(const Geometry& g, int64_t i, int64_t j) {
  const int64_t qpos = g.Q0 + i;
  return (!g.causal || j <= qpos) && (g.window == 0 || j > qpos - g.window);
}

// Tiles of the key segment [off, off + len) (tile t covers [off + t * bk, ...)) that hold at least
// one key visible to a query of [i0, i0 + bq). Empty when the segment is hidden from the whole tile.
LK_HD TileSpan key_tiles(const Geometry& g, int64_t i0, int64_t bq, int64_t off, int64_t len, int64_t bk) {
  const Range vis = visible_keys(g, i0, bq);
  const int64_t lo = vis.lo > off ? vis.lo : off;
  const int64_t hi = vis.hi < off + len ? vis.hi : off + len;
  if (hi <= lo) return {0, 0};
  return {(lo - off) / bk, ceil_div(hi - off, bk)};
}

// Query tiles (tile t covers [t * bq, ...)) holding at least one query that sees a key of
// [a0, a0 + bk_valid).
LK_HD TileSpan query_tiles(const Geometry& g, int64_t a0, int64_t bk_valid, int64_t bq) {
  const Range rows = visible_queries(g, a0, bk_valid);
  if (rows.hi <= rows.lo) return {0, 0};
  return {rows.lo / bq, ceil_div(rows.hi, bq)};
}

// Kernels owning the query rows (forward, dq): a key tile narrower than BK must hide its missing
// columns, or they would leak into the valid rows' softmax; missing rows are just not written.
LK_HD bool query_owner_needs_mask(const Geometry& g, int64_t i0, int64_t bq_valid, int64_t a0, int64_t bk_valid,
                                  int64_t bk_max) {
  return bk_valid < bk_max || !tile_fully_visible(g, i0, bq_valid, a0, bk_valid);
}

// Kernel owning the key rows (dk/dv): a query tile shorter than BQ must hide its missing queries,
// or they would leak into the valid keys' gradients; missing key rows are just not written.
LK_HD bool key_owner_needs_mask(const Geometry& g, int64_t i0, int64_t bq_valid, int64_t bq_max, int64_t a0,
                                int64_t bk_valid) {
  return bq_valid < bq_max || !tile_fully_visible(g, i0, bq_valid, a0, bk_valid);
}

}  // namespace longkernels::tiles
