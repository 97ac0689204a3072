// The AVX2 row kernels of tile_gemm.h. The softmax rows (exp_sum_avx2, softmax_grad_avx2) against
// double-precision exp and against vec_math.h's exp_approx, which the other ISAs' row loops use: every tail
// length, the special values (-inf, NaN, +inf, underflow, overflow clamps) and nothing written past the row.
// Decoding's dot products (dots_f32 on AVX2, dots_bf16_rows_avx2) against double sums, every row count and
// head-dim tail, bfloat16 rows giving the bits float32 rows widened from them give; pv_bf16_row_avx2 likewise
// against gemm_f32. Exit status 0 on success, 77 (ctest's skip) where the CPU lacks AVX2 with FMA, saying so.
#include <cmath>
#include <cstring>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/tile_gemm.h"
#include "cpu/vec_math.h"

namespace {

using longkernels::cpu::exp_approx;
namespace tile = longkernels::cpu::tile;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kGuard = 12345.0f;  // written past each row; must survive

int failures = 0;

void expect(bool ok, const char* what, int n, int i, double got, double want) {
  if (ok) return;
  ++failures;
  if (failures <= 20) std::printf("FAIL %s: n=%d i=%d got %.9g want %.9g\n", what, n, i, got, want);
}

// Same value, as the kernels promise: NaN for NaN, and within `ulps` float spacings of the double result.
bool close(float got, double want, double ulps) {
  if (std::isnan(want)) return std::isnan(got);
  if (want == 0.0) return got == 0.0f;
  return std::fabs(got - want) <= ulps * std::numeric_limits<float>::epsilon() * std::fabs(want);
}

// exp as the kernels define it: clamped to [-87, 88], 0 below -87 (and for -inf), NaN for NaN.
double exp_spec(double x) {
  if (std::isnan(x)) return x;
  if (x < -87.0) return 0.0;
  return std::exp(std::min(x, 88.0));
}

std::vector<float> row(std::mt19937& gen, int n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> s(n + 8, kGuard);
  for (int i = 0; i < n; ++i) s[i] = u(gen);
  return s;
}

void test_exp_sum(std::mt19937& gen) {
  for (int n = 0; n <= 80; ++n) {
    for (int kind = 0; kind < 3; ++kind) {
      std::vector<float> s = row(gen, n, -30.0f, 0.0f);
      if (kind == 1 && n > 0) {  // specials at every phase of the vector loop
        for (int i = 0; i < n; i += 3) s[i] = -kInf;
        for (int i = 1; i < n; i += 7) s[i] = -86.9f - static_cast<float>(i % 5);  // both sides of the underflow
      }
      const float m = kind == 2 ? 0.5f : 0.0f;
      const std::vector<float> x = s;
      const float sum = tile::exp_sum_avx2(s.data(), n, m);
      double want_sum = 0;
      for (int i = 0; i < n; ++i) {
        const float xm = x[i] - m;  // the kernel's argument, rounded as it rounds it
        const double want = exp_spec(xm);
        want_sum += want;
        expect(close(s[i], want, 3), "exp_sum_avx2 vs exp", n, i, s[i], want);
        expect(close(s[i], exp_approx(xm), 2), "exp_sum_avx2 vs exp_approx", n, i, s[i], exp_approx(xm));
      }
      expect(std::fabs(sum - want_sum) <= 1e-5 * std::max(1.0, want_sum), "exp_sum_avx2 sum", n, -1, sum, want_sum);
      for (int i = n; i < n + 8; ++i) expect(s[i] == kGuard, "exp_sum_avx2 wrote past the row", n, i, s[i], kGuard);
    }
  }
  // A NaN reaches its lane and the sum; +inf and huge arguments clamp to exp(88), as exp_approx.
  std::vector<float> s = {0.0f, kNaN, -1.0f, 100.0f, kInf, -kInf, -200.0f, 88.0f, -0.5f, kGuard};
  const float sum = tile::exp_sum_avx2(s.data(), 9, 0.0f);
  expect(std::isnan(s[1]) && std::isnan(sum), "exp_sum_avx2 NaN", 9, 1, s[1], kNaN);
  expect(close(s[3], std::exp(88.0), 3) && close(s[4], std::exp(88.0), 3), "exp_sum_avx2 clamp", 9, 3, s[3],
         std::exp(88.0));
  expect(s[5] == 0.0f && s[6] == 0.0f, "exp_sum_avx2 underflow", 9, 5, s[5], 0.0);
  expect(s[9] == kGuard, "exp_sum_avx2 wrote past the row", 9, 9, s[9], kGuard);
}

void test_softmax_grad(std::mt19937& gen) {
  for (int n = 0; n <= 80; ++n) {
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<float> s = row(gen, n, -4.0f, 4.0f), dp = row(gen, n, -1.0f, 1.0f);
      if (kind == 1 && n > 2) s[n / 2] = kNaN, dp[n - 1] = kNaN;
      const float scale = 0.37f, slope = kind ? 0.0625f : 0.0f, lse = 3.5f, delta = 0.25f;
      const int32_t d0 = -5;
      const std::vector<float> s0 = s, dp0 = dp;
      tile::softmax_grad_avx2(s.data(), dp.data(), n, scale, slope, d0, lse, delta);
      for (int i = 0; i < n; ++i) {
        // The logit as the kernel rounds it (float products and sums), the rest in double.
        const float logit = s0[i] * scale + slope * static_cast<float>(i + d0) - lse;
        const double e = exp_spec(logit);
        const double p = e > 1.0 ? 1.0 : e;
        const double g = p * (static_cast<double>(dp0[i]) - delta);
        // The logit's own rounding (a few ulp of |logit|) moves exp by as many relative ulp.
        expect(close(s[i], p, 4 + 4 * std::fabs(logit)), "softmax_grad_avx2 p", n, i, s[i], p);
        const double g_tol = (8 + 4 * std::fabs(logit)) * 1.2e-7 * std::fabs(g) + 1e-7;
        expect(std::isnan(g) ? std::isnan(dp[i]) : std::fabs(dp[i] - g) <= g_tol, "softmax_grad_avx2 ds", n, i,
               dp[i], g);
      }
      for (int i = n; i < n + 8; ++i) {
        expect(s[i] == kGuard, "softmax_grad_avx2 wrote past s", n, i, s[i], kGuard);
        expect(dp[i] == kGuard, "softmax_grad_avx2 wrote past dp", n, i, dp[i], kGuard);
      }
    }
  }
  // Huge logits: p never above 1.
  std::vector<float> s = {1e7f, 90.0f, kInf}, dp = {1.0f, 1.0f, 1.0f};
  tile::softmax_grad_avx2(s.data(), dp.data(), 3, 1.0f, 0.0f, 0, 0.0f, 0.0f);
  for (int i = 0; i < 3; ++i) expect(s[i] == 1.0f, "softmax_grad_avx2 p <= 1", 3, i, s[i], 1.0);
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// x's top 16 bits: truncated to bfloat16 (any bfloat16 value will do for these tests).
uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>(bits >> 16);
}

void test_dots(std::mt19937& gen) {
  std::normal_distribution<float> nd;
  using longkernels::cpu::F32Tiles;
  for (int R : {1, 2, 3, 4, 5, 8}) {
    for (int D : {1, 7, 8, 20, 64, 67, 128}) {
      for (int n : {1, 3, 8, 13, 16}) {
        const int ldq = D + 3, lds = 20;
        std::vector<float> Q(R * ldq);
        for (float& x : Q) x = nd(gen);
        std::vector<std::vector<uint16_t>> kb(n, std::vector<uint16_t>(D));
        std::vector<std::vector<float>> kf(n, std::vector<float>(D));
        std::vector<const uint16_t*> rb(n);
        std::vector<const float*> rf(n);
        for (int j = 0; j < n; ++j) {
          for (int d = 0; d < D; ++d) {
            kb[j][d] = bf16_bits(nd(gen));
            kf[j][d] = bf16_to_float(kb[j][d]);
          }
          rb[j] = kb[j].data(), rf[j] = kf[j].data();
        }
        std::vector<float> Sf(R * lds, kGuard), Sb(R * lds, kGuard);
        tile::dots_f32(F32Tiles::Avx2, R, D, Q.data(), ldq, rf.data(), n, Sf.data(), lds);
        for (int r0 = 0; r0 < R; r0 += 4)  // dots_bf16_rows_avx2 takes any R; four rows a call as the decoder's
          tile::dots_bf16_rows_avx2(std::min(4, R - r0), D, Q.data() + r0 * ldq, ldq, rb.data(), n,
                                    Sb.data() + r0 * lds, lds);
        for (int r = 0; r < R; ++r) {
          for (int j = 0; j < lds; ++j) {
            const float got = Sf[r * lds + j];
            if (j >= n) {
              expect(got == kGuard && Sb[r * lds + j] == kGuard, "dots wrote past n", n, j, got, kGuard);
              continue;
            }
            double want = 0, mag = 0;
            for (int d = 0; d < D; ++d) {
              want += static_cast<double>(Q[r * ldq + d]) * kf[j][d];
              mag += std::fabs(static_cast<double>(Q[r * ldq + d]) * kf[j][d]);
            }
            expect(std::fabs(got - want) <= 1e-6 * mag + 1e-30, "dots_f32 avx2 vs double", n, r * 1000 + j, got,
                   want);
            // bf16 rows: the bits of the float32 kernel on the widened rows (each sum in the same order).
            expect(Sb[r * lds + j] == got, "dots_bf16_rows_avx2 vs dots_f32", n, r * 1000 + j, Sb[r * lds + j], got);
          }
        }
      }
    }
  }
}

// Decoding's o += p V for one row over bfloat16 value rows (pv_bf16_row_avx2): the bits gemm_f32 gives on the
// widened rows, every head-dim tail and panel mix, o's columns past Dv rounded to 8 left alone. Each row is its own
// allocation of exactly Dv elements, so a read past a row would be a heap overflow (caught under sanitizers).
void test_pv_row(std::mt19937& gen) {
  std::normal_distribution<float> nd;
  using longkernels::cpu::F32Tiles;
  for (int Dv : {1, 5, 8, 13, 64, 72, 77, 128, 131}) {
    for (int n : {1, 2, 7, 64}) {
      const int width = (Dv + 15) / 16 * 16 + 8;  // o padded as the decoder pads it, then guard columns
      std::vector<std::vector<uint16_t>> vb(n);
      std::vector<float> vf(n * width, 0.0f);  // the widened block, rows `width` apart, zero past Dv
      std::vector<const uint16_t*> rows(n);
      std::vector<float> p(n);
      for (int j = 0; j < n; ++j) {
        vb[j].resize(Dv);
        for (int c = 0; c < Dv; ++c) {
          vb[j][c] = bf16_bits(nd(gen));
          vf[j * width + c] = bf16_to_float(vb[j][c]);
        }
        rows[j] = vb[j].data();
        p[j] = nd(gen);
      }
      std::vector<float> o(width), want(width);
      for (int c = 0; c < width; ++c) o[c] = c < Dv ? nd(gen) : kGuard;
      want = o;
      tile::pv_bf16_row_avx2(Dv, p.data(), rows.data(), n, o.data());
      const int cols = (Dv + 15) / 16 * 16;
      tile::gemm_f32(F32Tiles::Avx2, 1, cols, n, p.data(), n, vf.data(), width, want.data(), width, true);
      for (int c = 0; c < width; ++c) {
        if (c < Dv) {
          expect(o[c] == want[c], "pv_bf16_row_avx2 vs gemm_f32 on widened rows", n, c, o[c], want[c]);
        } else if (c >= (Dv + 7) / 8 * 8) {
          expect(o[c] == kGuard, "pv_bf16_row_avx2 wrote past Dv rounded to 8", n, c, o[c], kGuard);
        }
      }
    }
  }
}

}  // namespace

int main() {
  if (!longkernels::cpu::has_avx2_fma()) {
    std::printf("skipped: this CPU has no AVX2 with FMA, so the AVX2 row kernels cannot run here\n");
    return 77;
  }
  std::mt19937 gen(20261207);
  test_exp_sum(gen);
  test_softmax_grad(gen);
  test_dots(gen);
  test_pv_row(gen);
  std::printf("%s: %d failures\n", failures ? "FAIL" : "ok", failures);
  return failures ? 1 : 0;
}
