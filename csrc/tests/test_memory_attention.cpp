// C++ parity test of the CPU kernels, through the dispatcher as any caller would reach them:
// forward, LSE and all five gradients against plain ATen ops with autograd, in double.
// Exit status 0 on success; prints one line per case.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <optional>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

struct Case {
  int64_t B, H, Hkv, N, M, D, Dv;
  bool causal;
  int64_t window;
  bool alibi;
};

// The semantics, with materialised scores (docs/semantics.md §1).
std::tuple<Tensor, Tensor> reference(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mk,
                                     const Tensor& mv, const std::optional<Tensor>& slopes, const Case& c,
                                     double scale) {
  const int64_t group = c.H / c.Hkv;
  Tensor keys = at::cat({mk, k}, 2).repeat_interleave(group, 1);
  Tensor vals = at::cat({mv, v}, 2).repeat_interleave(group, 1);
  Tensor s = at::matmul(q, keys.transpose(-1, -2)) * scale;
  Tensor qpos = at::arange(c.N, at::kLong).unsqueeze(1) + c.M;
  Tensor kpos = at::arange(c.M + c.N, at::kLong).unsqueeze(0);
  if (slopes) s = s - slopes->view({1, c.H, 1, 1}) * (qpos - kpos).to(at::kDouble);
  Tensor visible = at::ones({c.N, c.M + c.N}, at::kBool);
  if (c.causal) visible = visible.logical_and(kpos <= qpos);
  if (c.window) visible = visible.logical_and(kpos > qpos - c.window);
  s = s.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  Tensor lse = at::logsumexp(s, -1);
  return {at::matmul(at::exp(s - lse.unsqueeze(-1)), vals), lse};
}

double rel(const Tensor& a, const Tensor& b) {
  const double den = b.norm().item<double>();
  const double num = (a - b).norm().item<double>();
  return den > 0 ? num / den : num;
}

bool run_case(const Case& c) {
  using Opt = const std::optional<Tensor>&;
  using OptInt = std::optional<int64_t>;
  using Fwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         Opt, bool, int64_t, double, Opt, Opt, double, Opt, OptInt);
  using Bwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      Opt, const Tensor&, const Tensor&, bool, int64_t, double, Opt, Opt, double, OptInt);
  static auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("longkernels::memory_attention_fwd", "").typed<Fwd>();
  static auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("longkernels::memory_attention_bwd", "").typed<Bwd>();

  const auto opt = at::TensorOptions().dtype(at::kDouble);
  Tensor q = at::randn({c.B, c.H, c.N, c.D}, opt), k = at::randn({c.B, c.Hkv, c.N, c.D}, opt);
  Tensor v = at::randn({c.B, c.Hkv, c.N, c.Dv}, opt);
  Tensor mk = at::randn({c.B, c.Hkv, c.M, c.D}, opt), mv = at::randn({c.B, c.Hkv, c.M, c.Dv}, opt);
  std::optional<Tensor> slopes;
  if (c.alibi) slopes = at::rand({c.H}, opt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  Tensor dout = at::randn({c.B, c.H, c.N, c.Dv}, opt), dlse = at::randn({c.B, c.H, c.N}, opt);

  const std::optional<Tensor> none;  // no padding mask, documents or sinks; no softcap
  const OptInt q_offset;  // the queries at M + i
  auto [out, lse] = fwd.call(q, k, v, mk, mv, slopes, c.causal, c.window, scale, none, none, 0.0, none, q_offset);
  Tensor delta = (dout * out).sum(-1) - dlse;
  auto [dq, dk, dv, dmk, dmv] =
      bwd.call(dout, q, k, v, mk, mv, slopes, lse, delta, c.causal, c.window, scale, none, none, 0.0, q_offset);

  std::vector<Tensor> leaves = {q, k, v, mk, mv};
  for (auto& t : leaves) t = t.detach().requires_grad_(true);
  auto [rout, rlse] = reference(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], slopes, c, scale);
  ((rout * dout).sum() + (rlse * dlse).sum()).backward();

  const double errs[] = {rel(out, rout.detach()), rel(lse, rlse.detach()), rel(dq, leaves[0].grad()),
                         rel(dk, leaves[1].grad()), rel(dv, leaves[2].grad()),
                         c.M ? rel(dmk, leaves[3].grad()) : 0.0, c.M ? rel(dmv, leaves[4].grad()) : 0.0};
  double worst = 0;
  for (double e : errs) worst = std::max(worst, e);
  const bool ok = worst < 1e-10;
  std::printf("%s B=%ld H=%ld/%ld N=%ld M=%ld D=%ld/%ld causal=%d window=%ld alibi=%d: worst rel err %.2e\n",
              ok ? "ok  " : "FAIL", c.B, c.H, c.Hkv, c.N, c.M, c.D, c.Dv, c.causal, c.window, c.alibi, worst);
  return ok;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const Case cases[] = {
      {1, 2, 2, 1, 0, 16, 16, true, 0, false},       {1, 4, 2, 37, 53, 80, 48, true, 0, true},
      {2, 3, 1, 300, 600, 64, 64, true, 0, false},   {1, 2, 2, 530, 0, 32, 32, true, 200, true},
      {1, 2, 1, 129, 700, 16, 24, false, 0, false},  {1, 2, 2, 90, 40, 16, 16, false, 7, true},
  };
  int failures = 0;
  for (const Case& c : cases) failures += !run_case(c);
  std::printf("%d passed, %d failed\n", static_cast<int>(std::size(cases)) - failures, failures);
  return failures ? 1 : 0;
}
