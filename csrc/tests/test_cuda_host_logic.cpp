// The CUDA kernels' host-includable logic, on a machine without a GPU (docs/decisions.md, "CUDA kernels"):
//   * the memory-attention tile schedule (cuda/memory_attention_schedule.h) against the pairwise mask, over
//     every small geometry (causal or not, windows, empty memory, query offsets before, on and past the keys):
//     the key tiles a query tile visits cover its visible pairs and each holds one, a tile called unmasked has
//     every pair visible, and the same for the query tiles a key tile visits;
//   * a row's end (common/memory_attention_rows.h, shared with the CPU kernels): normalisation and LSE with and
//     without a sink against long double, rows that saw no key, NaNs; the softcap;
//   * the LSH hash's argmax and the fold of factorised buckets (cuda/lsh_hash.h) against torch.argmax's rule
//     over [y, -y] per factor, with ties and NaNs.
// Exit status 0 on success.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "common/memory_attention_rows.h"
#include "cuda/lsh_hash.h"
#include "cuda/memory_attention_schedule.h"

namespace {

namespace tiles = longkernels::tiles;
namespace rows = longkernels::rows;
namespace lsh = longkernels::lsh;

int failures = 0;

void fail(const char* what, const char* fmt_detail, long long a, long long b, long long c, long long d) {
  ++failures;
  if (failures > 20) return;
  std::printf("FAIL %s: ", what);
  std::printf(fmt_detail, a, b, c, d);
  std::printf("\n");
}

// ---------------------------------------------------------------------------------------------
// Schedule.
// ---------------------------------------------------------------------------------------------
// Whether any / every pair of queries [i0, i0 + bq) and keys [a0, a0 + bk) is visible.
struct TileView {
  bool any = false, all = true;
};
TileView scan_tile(const tiles::Geometry& g, int64_t i0, int64_t bq, int64_t a0, int64_t bk) {
  TileView t;
  for (int64_t i = i0; i < i0 + bq; ++i)
    for (int64_t j = a0; j < a0 + bk; ++j) {
      const bool v = tiles::visible(g, i, j);
      t.any = t.any || v;
      t.all = t.all && v;
    }
  return t;
}

void check_geometry(const tiles::Geometry& g, int64_t bq, int64_t bk) {
  // Query-owned (forward, dq): key tiles aligned to each segment's start.
  for (int64_t i0 = 0; i0 < g.N; i0 += bq) {
    const int64_t bq_valid = std::min(bq, g.N - i0);
    for (int seg = 0; seg < 2; ++seg) {
      const int64_t off = seg ? g.M : 0, len = seg ? g.N : g.M;
      const tiles::TileSpan span = tiles::key_tiles(g, i0, bq_valid, off, len, bk);
      for (int64_t j = off; j < off + len; ++j) {
        const int64_t t = (j - off) / bk;
        bool seen = false;
        for (int64_t i = i0; i < i0 + bq_valid; ++i) seen = seen || tiles::visible(g, i, j);
        if (seen && (t < span.first || t >= span.last))
          fail("key_tiles misses a visible key", "i0=%lld j=%lld span=[%lld,%lld)", i0, j, span.first, span.last);
      }
      for (int64_t t = span.first; t < span.last; ++t) {
        const int64_t a0 = off + t * bk, bk_valid = std::min(bk, off + len - a0);
        const auto [any, all] = scan_tile(g, i0, bq_valid, a0, bk_valid);
        if (!any) fail("key_tiles visits a hidden tile", "i0=%lld a0=%lld N=%lld M=%lld", i0, a0, g.N, g.M);
        if (!tiles::query_owner_needs_mask(g, i0, bq_valid, a0, bk_valid, bk) && !all)
          fail("unmasked query-owned tile hides a pair", "i0=%lld a0=%lld Q0=%lld w=%lld", i0, a0, g.Q0, g.window);
        if (bk_valid < bk && !tiles::query_owner_needs_mask(g, i0, bq_valid, a0, bk_valid, bk))
          fail("short key tile left unmasked", "i0=%lld a0=%lld bk=%lld %lld", i0, a0, bk_valid, bk);
      }
    }
  }
  // Key-owned (dk/dv): query tiles aligned to 0.
  for (int seg = 0; seg < 2; ++seg) {
    const int64_t off = seg ? g.M : 0, len = seg ? g.N : g.M;
    for (int64_t a0 = off; a0 < off + len; a0 += bk) {
      const int64_t bk_valid = std::min(bk, off + len - a0);
      const tiles::TileSpan span = tiles::query_tiles(g, a0, bk_valid, bq);
      for (int64_t i = 0; i < g.N; ++i) {
        bool seen = false;
        for (int64_t j = a0; j < a0 + bk_valid; ++j) seen = seen || tiles::visible(g, i, j);
        if (seen && (i / bq < span.first || i / bq >= span.last))
          fail("query_tiles misses a query", "a0=%lld i=%lld span=[%lld,%lld)", a0, i, span.first, span.last);
      }
      for (int64_t t = span.first; t < span.last; ++t) {
        const int64_t i0 = t * bq, bq_valid = std::min(bq, g.N - i0);
        const auto [any, all] = scan_tile(g, i0, bq_valid, a0, bk_valid);
        if (!any) fail("query_tiles visits a hidden tile", "a0=%lld i0=%lld N=%lld M=%lld", a0, i0, g.N, g.M);
        if (!tiles::key_owner_needs_mask(g, i0, bq_valid, bq, a0, bk_valid) && (!all || bq_valid < bq))
          fail("unmasked key-owned tile hides a pair", "a0=%lld i0=%lld Q0=%lld w=%lld", a0, i0, g.Q0, g.window);
      }
    }
  }
}

void test_schedule() {
  int geometries = 0;
  for (int64_t N = 1; N <= 9; ++N)
    for (int64_t M = 0; M <= 7; ++M)
      for (const int64_t dq0 : {int64_t(0), int64_t(-3), int64_t(4), -M - N - 2, N + 3})  // Q0 = M + dq0: memory attention, ring blocks
        for (const bool causal : {true, false})
          for (const int64_t window : {int64_t(0), int64_t(1), int64_t(2), int64_t(5)}) {
            const int64_t Q0 = M + dq0;
            tiles::Geometry g{N, M, Q0, causal, window};
            for (const int64_t bq : {int64_t(1), int64_t(2), int64_t(3), int64_t(4)})
              for (const int64_t bk : {int64_t(1), int64_t(2), int64_t(3), int64_t(5)}) check_geometry(g, bq, bk);
            ++geometries;
          }
  std::printf("schedule: %d geometries x 16 tile shapes\n", geometries);
}

// ---------------------------------------------------------------------------------------------
// A row's end and the softcap.
// ---------------------------------------------------------------------------------------------
template <typename T>
void check_row_end(T m, T l, bool has_sink, T sink, double tol) {
  const rows::RowEnd<T> got = rows::finish_row(m, l, has_sink, sink);
  const long double inf = std::numeric_limits<long double>::infinity();
  long double lse, inv;
  if (std::isnan(m) || (has_sink && std::isnan(sink))) {
    if (!std::isnan(got.lse)) fail("finish_row: NaN in, LSE not NaN", "%lld %lld %lld %lld", 0, 0, 0, 0);
    return;
  }
  if (m == -std::numeric_limits<T>::infinity()) {
    lse = has_sink ? static_cast<long double>(sink) : -inf;
    inv = 0;
  } else {
    const long double den = static_cast<long double>(l) * std::exp(static_cast<long double>(m)) +
                            (has_sink ? std::exp(static_cast<long double>(sink)) : 0.0L);
    lse = std::log(den);
    inv = std::exp(static_cast<long double>(m) - lse);  // out = acc * inv, acc = sum exp(s - m) v
  }
  const bool lse_ok = std::isinf(static_cast<double>(lse))
                          ? got.lse == static_cast<T>(lse)
                          : std::fabs(static_cast<long double>(got.lse) - lse) <= tol * (1 + std::fabs(lse));
  // inv = exp(m - lse) carries the rounding of its argument, |m - lse| units of T's epsilon; below T's normal
  // range it may round to 0 (a sink that outweighs every key by thousands of nats).
  const long double spread = 1 + std::fabs(static_cast<long double>(m) - lse);
  const bool inv_ok = inv == 0 ? got.inv == T(0)
                               : std::fabs(got.inv - inv) <= tol * spread * inv + std::numeric_limits<T>::min();
  if (!lse_ok || !inv_ok) {
    ++failures;
    if (failures <= 20)
      std::printf("FAIL finish_row(m=%g, l=%g, sink=%s%g): got inv %g lse %g, want %Lg %Lg\n", double(m), double(l),
                  has_sink ? "" : "none ", double(sink), double(got.inv), double(got.lse), inv, lse);
  }
}

template <typename T>
void test_rows(double tol) {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  std::mt19937 gen(7);
  std::uniform_real_distribution<double> mu(-60, 60), lu(1, 500), su(-80, 80);
  for (int n = 0; n < 2000; ++n) {
    const T m = T(mu(gen)), l = T(lu(gen)), sink = T(su(gen));
    check_row_end<T>(m, l, false, T(0), tol);
    check_row_end<T>(m, l, true, sink, tol);
    check_row_end<T>(m, l, true, T(m + T(5e3)), tol);  // the sink outweighs every key: output ~0, LSE = sink
    check_row_end<T>(m, l, true, T(m - T(5e3)), tol);  // the sink adds nothing
  }
  for (const T sink : {T(-3), T(0), T(40)}) {
    check_row_end<T>(-inf, T(0), true, sink, tol);  // no visible key: out 0, LSE = sink
  }
  check_row_end<T>(-inf, T(0), false, T(0), tol);  // no visible key, no sink: out 0, LSE -inf
  check_row_end<T>(nan, T(1), false, T(0), tol);
  check_row_end<T>(T(1), T(1), true, nan, tol);
  check_row_end<T>(nan, T(1), true, T(1), tol);
  // The softcap: cap * tanh(dot * scale / cap).
  std::uniform_real_distribution<double> du(-200, 200);
  for (int n = 0; n < 1000; ++n) {
    const T dot = T(du(gen)), cap = T(1 + n % 30), scale = T(0.125);
    T t = 0;
    const T got = rows::softcap_logit(dot, T(scale / cap), cap, &t);
    const long double want = static_cast<long double>(cap) * std::tanh(static_cast<long double>(dot) * scale / cap);
    if (std::fabs(got - want) > 4 * tol * cap || std::fabs(t * cap - got) > tol * cap)
      fail("softcap_logit", "n=%lld cap=%lld %lld %lld", n, static_cast<long long>(cap), 0, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// LSH: torch.argmax over [y, -y] (first index on ties, a NaN the largest), and factorised buckets.
// ---------------------------------------------------------------------------------------------
int argmax_first(const std::vector<float>& x) {
  int best = 0;
  for (int i = 1; i < static_cast<int>(x.size()); ++i) {
    if (std::isnan(x[best])) break;
    if (std::isnan(x[i]) || x[i] > x[best]) best = i;
  }
  return best;
}

void test_lsh() {
  std::mt19937 gen(11);
  std::uniform_int_distribution<int> small(-3, 3);  // many ties
  std::normal_distribution<float> normal;
  const std::vector<std::vector<int>> factor_sets = {{2}, {8}, {6}, {4, 6}, {8, 4, 2}, {16, 32}, {2, 2, 2, 2, 2}};
  int tokens = 0;
  for (const auto& factors : factor_sets) {
    int columns = 0;
    for (const int f : factors) columns += f / 2;
    for (int n = 0; n < 3000; ++n) {
      std::vector<float> y(columns);
      for (float& v : y) v = n % 3 == 0 ? float(small(gen)) : normal(gen);
      if (n % 17 == 0) y[gen() % columns] = std::numeric_limits<float>::quiet_NaN();
      if (n % 29 == 0) y[gen() % columns] = -0.0f;
      // The kernel's way: per factor, running argmaxes of y and -y, combined, folded.
      lsh::FactorFold fold;
      int c0 = 0;
      for (const int f : factors) {
        const int K = f / 2;
        lsh::ArgmaxFirst pos, neg;
        for (int k = 0; k < K; ++k) {
          pos.offer(y[c0 + k], k);
          neg.offer(-y[c0 + k], K + k);
        }
        fold.add(lsh::bucket_of(pos, neg), K);
        c0 += K;
      }
      // The reference's way: argmax of the concatenation per factor, b_1 + n_1 b_2 + ...
      int want = 0, weight = 1;
      c0 = 0;
      for (const int f : factors) {
        const int K = f / 2;
        std::vector<float> cat(y.begin() + c0, y.begin() + c0 + K);
        for (int k = 0; k < K; ++k) cat.push_back(-y[c0 + k]);
        want += weight * argmax_first(cat);
        weight *= f;
        c0 += K;
      }
      if (fold.bucket != want) fail("lsh bucket", "token %lld: got %lld want %lld (factors %lld)", n, fold.bucket, want,
                                    static_cast<long long>(factors.size()));
      ++tokens;
    }
  }
  std::printf("lsh: %d tokens over %zu factor sets\n", tokens, factor_sets.size());
}

}  // namespace

int main() {
  test_schedule();
  test_rows<float>(2e-6);
  test_rows<double>(1e-13);
  std::printf("rows: finish_row and softcap_logit, float and double\n");
  test_lsh();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
