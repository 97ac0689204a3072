#pragma once
// What the memory safety of every registered op depends on, checked at entry with TORCH_CHECK (a
// RuntimeError in Python) before anything is read: ranks, dtypes, devices, that sizes agree between
// arguments, head grouping, integer ranges. The ops are public surface (torch.compile graphs, exported
// programs and users call torch.ops.longkernels.* directly); the Python functions check first, with
// errors that name the argument, and these checks are the floor under them. Device-independent: the CPU
// and CUDA implementations call the same ones, plus their own device checks.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace longkernels::checks {

inline bool is_floating(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// A defined tensor of `ndim` dimensions, floating point, on `device`.
inline void floating(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions, got ", t.dim());
  TORCH_CHECK(is_floating(t.scalar_type()), op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

inline void shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------
// Memory attention (q (B, H, N, D); k, v (B, Hkv, N, D / Dv); mem_k, mem_v (B, Hkv, M, D / Dv)).
// ---------------------------------------------------------------------------------------------
struct MemoryAttentionDims {
  int64_t B, H, Hkv, N, M, D, Dv;
  int64_t window;  // 0: none (also for a window that hides nothing, window >= Q0 + N)
  int64_t Q0;      // position of query 0: M, unless q_offset places the queries elsewhere
};

// Bound on |q_offset|: positions stay far from int64 overflow in every sum the kernels form.
constexpr int64_t kMaxQueryOffset = int64_t(1) << 52;

inline MemoryAttentionDims memory_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& mem_k, const at::Tensor& mem_v,
                                            const std::optional<at::Tensor>& alibi_slopes, int64_t window,
                                            std::optional<int64_t> q_offset = std::nullopt) {
  TORCH_CHECK(q.defined() && q.dim() == 4, op, ": q must be a 4-D tensor (B, H, N, D)");
  const at::Device dev = q.device();
  floating(op, "q", q, 4, dev);
  floating(op, "k", k, 4, dev);
  floating(op, "v", v, 4, dev);
  floating(op, "mem_k", mem_k, 4, dev);
  floating(op, "mem_v", mem_v, 4, dev);
  for (const at::Tensor* t : {&k, &v, &mem_k, &mem_v})
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v, mem_k and mem_v must share one dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  MemoryAttentionDims d{q.size(0), q.size(1), k.size(1), q.size(2), mem_k.size(2), q.size(3), v.size(3), window,
                        mem_k.size(2)};
  if (q_offset.has_value()) {
    TORCH_CHECK(*q_offset >= -kMaxQueryOffset && *q_offset <= kMaxQueryOffset, op, ": q_offset must lie in [-2^52, "
                "2^52], got ", *q_offset);
    d.Q0 = *q_offset;
  }
  TORCH_CHECK(d.Hkv >= 1 && d.H % d.Hkv == 0, op, ": the query heads (", d.H,
              ") must be a multiple of the key/value heads (", d.Hkv, ")");
  TORCH_CHECK(d.D >= 1 && d.Dv >= 1, op, ": head dims must be at least 1, got D=", d.D, ", Dv=", d.Dv);
  shape(op, "k", k, {d.B, d.Hkv, d.N, d.D});
  shape(op, "v", v, {d.B, d.Hkv, d.N, d.Dv});
  shape(op, "mem_k", mem_k, {d.B, d.Hkv, d.M, d.D});
  shape(op, "mem_v", mem_v, {d.B, d.Hkv, d.M, d.Dv});
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    TORCH_CHECK(s.defined() && s.dim() == 1 && s.size(0) == d.H, op, ": alibi_slopes must have shape (H=", d.H, ",)");
    TORCH_CHECK(is_floating(s.scalar_type()) && s.device() == dev, op,
                ": alibi_slopes must be a floating tensor on ", dev);
  }
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: no window), got ", window);
  // A window that hides nothing (no visible distance reaches it) is none; the kernels' sums stay far from overflow.
  if (window >= d.Q0 + d.N) d.window = 0;
  return d;
}

inline void memory_attention_grads(const char* op, const MemoryAttentionDims& d, const at::Tensor& q,
                                   const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta) {
  floating(op, "dout", dout, 4, q.device());
  shape(op, "dout", dout, {d.B, d.H, d.N, d.Dv});
  floating(op, "lse", lse, 3, q.device());
  shape(op, "lse", lse, {d.B, d.H, d.N});
  floating(op, "delta", delta, 3, q.device());
  shape(op, "delta", delta, {d.B, d.H, d.N});
}

// The masks and score terms of memory attention: key_padding_mask (B, M + N) bool, document_ids (B, M + N)
// integer (non-decreasing: checked where the bounds are built), softcap >= 0 and finite, sinks (H,) floating.
inline void memory_attention_masks(const char* op, const MemoryAttentionDims& d, const at::Device& dev,
                                   const std::optional<at::Tensor>& key_padding_mask,
                                   const std::optional<at::Tensor>& document_ids, double softcap,
                                   const std::optional<at::Tensor>* sinks) {
  const int64_t L = d.M + d.N;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.defined() && m.scalar_type() == at::kBool, op, ": key_padding_mask must be a bool tensor");
    TORCH_CHECK(m.device() == dev, op, ": key_padding_mask must be on ", dev, ", got ", m.device());
    shape(op, "key_padding_mask", m, {d.B, L});
  }
  if (document_ids.has_value()) {
    const at::Tensor& t = *document_ids;
    TORCH_CHECK(t.defined() && at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op,
                ": document_ids must be an integer tensor");
    TORCH_CHECK(t.device() == dev, op, ": document_ids must be on ", dev, ", got ", t.device());
    shape(op, "document_ids", t, {d.B, L});
    // A query's document is that of the key at its own position, which exists only for queries at M + i.
    TORCH_CHECK(d.Q0 == d.M, op, ": document_ids need the queries at positions M + i (q_offset = M)");
  }
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
  if (sinks != nullptr && sinks->has_value()) {
    const at::Tensor& s = **sinks;
    TORCH_CHECK(s.defined() && s.dim() == 1 && s.size(0) == d.H, op, ": sinks must have shape (H=", d.H, ",)");
    TORCH_CHECK(is_floating(s.scalar_type()) && s.device() == dev, op, ": sinks must be a floating tensor on ", dev);
  }
}

// ---------------------------------------------------------------------------------------------
// LSH attention.
// ---------------------------------------------------------------------------------------------
inline void key_padding_mask(const char* op, const std::optional<at::Tensor>& mask, int64_t B, int64_t L,
                             const at::Device& dev) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.defined() && m.scalar_type() == at::kBool, op, ": key_padding_mask must be a bool tensor");
  TORCH_CHECK(m.device() == dev, op, ": key_padding_mask must be on ", dev, ", got ", m.device());
  shape(op, "key_padding_mask", m, {B, L});
}

// qk (B, H, L, D), rotations (H, D, n_hashes, n_buckets / 2).
// bucket_factors (factorised hashing, trax's and HF's form): each even and >= 2, their product n_buckets; the
// rotations then have sum(factors) / 2 columns per round.
inline void lsh_hash_sort(const char* op, const at::Tensor& qk, const at::Tensor& rotations,
                          const std::optional<at::Tensor>& mask, int64_t n_buckets, int64_t padded_len,
                          at::OptionalIntArrayRef bucket_factors = std::nullopt) {
  TORCH_CHECK(qk.defined() && qk.dim() == 4, op, ": qk must be a 4-D tensor (B, H, L, D)");
  floating(op, "qk", qk, 4, qk.device());
  floating(op, "rotations", rotations, 4, qk.device());
  const int64_t B = qk.size(0), H = qk.size(1), L = qk.size(2), D = qk.size(3);
  TORCH_CHECK(n_buckets >= 2 && n_buckets % 2 == 0 && n_buckets < kInt32Max, op,
              ": n_buckets must be even and in [2, 2^31 - 1), got ", n_buckets);
  int64_t columns = n_buckets / 2;
  if (bucket_factors.has_value()) {
    TORCH_CHECK(!bucket_factors->empty(), op, ": bucket_factors must not be empty");
    int64_t product = 1;
    columns = 0;
    for (const int64_t f : *bucket_factors) {
      TORCH_CHECK(f >= 2 && f % 2 == 0 && f < kInt32Max, op, ": bucket_factors must be even and >= 2, got ", f);
      product *= f;
      columns += f / 2;
      TORCH_CHECK(product < kInt32Max, op, ": the product of bucket_factors exceeds int32");
    }
    TORCH_CHECK(product == n_buckets, op, ": n_buckets (", n_buckets, ") must be the product of bucket_factors (",
                product, ")");
  }
  TORCH_CHECK(rotations.size(0) == H && rotations.size(1) == D && rotations.size(3) == columns, op,
              ": rotations must have shape (H=", H, ", D=", D, ", n_hashes, ", columns, "), got ", rotations.sizes());
  TORCH_CHECK(padded_len >= L && padded_len <= kInt32Max, op, ": padded_len must be in [L=", L, ", 2^31 - 1], got ",
              padded_len);
  TORCH_CHECK(rotations.size(2) * padded_len <= kInt32Max, op, ": n_hashes * padded_len exceeds int32 indices");
  key_padding_mask(op, mask, B, L, qk.device());
}

struct LSHDims {
  int64_t B, H, L, D, Dv, nh, Lp, C;
};

// qk (B, H, L, D), v (B, H, L, Dv), perm (B, H, n_hashes, Lp) int32; chunks of C dividing Lp. Whether perm
// holds a permutation of [0, Lp) in each round is the implementations' check (it needs the data).
inline LSHDims lsh_attention(const char* op, const at::Tensor& qk, const at::Tensor& v, const at::Tensor& perm,
                             const std::optional<at::Tensor>& mask, int64_t chunk_size, int64_t before,
                             int64_t after) {
  TORCH_CHECK(qk.defined() && qk.dim() == 4, op, ": qk must be a 4-D tensor (B, H, L, D)");
  const at::Device dev = qk.device();
  floating(op, "qk", qk, 4, dev);
  floating(op, "v", v, 4, dev);
  TORCH_CHECK(v.scalar_type() == qk.scalar_type(), op, ": v must have qk's dtype ", qk.scalar_type(), ", got ",
              v.scalar_type());
  TORCH_CHECK(perm.defined() && perm.scalar_type() == at::kInt && perm.dim() == 4 && perm.device() == dev, op,
              ": perm must be a 4-D int32 tensor (B, H, n_hashes, padded_len) on ", dev);
  LSHDims d{qk.size(0), qk.size(1), qk.size(2), qk.size(3), v.size(3), perm.size(2), perm.size(3), chunk_size};
  TORCH_CHECK(d.D >= 1 && d.Dv >= 1, op, ": head dims must be at least 1, got D=", d.D, ", Dv=", d.Dv);
  shape(op, "v", v, {d.B, d.H, d.L, d.Dv});
  TORCH_CHECK(perm.size(0) == d.B && perm.size(1) == d.H, op, ": perm must be (B=", d.B, ", H=", d.H,
              ", n_hashes, padded_len), got ", perm.sizes());
  TORCH_CHECK(d.nh >= 1, op, ": perm must hold at least one round");
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK(d.Lp >= d.L && d.Lp % chunk_size == 0, op, ": perm's padded length ", d.Lp,
              " must be >= L=", d.L, " and a multiple of chunk_size=", chunk_size);
  TORCH_CHECK(d.nh * d.Lp <= kInt32Max, op, ": n_hashes * padded_len exceeds int32 indices");
  TORCH_CHECK(before >= 0 && after >= 0, op, ": n_chunks_before and n_chunks_after must be >= 0");
  TORCH_CHECK(before <= kInt32Max && after <= kInt32Max &&
                  (before + 1 + after) * ((chunk_size + 15) / 16 * 16) <= kInt32Max,
              op, ": the look-around window of ", before, " + 1 + ", after, " chunks of ", chunk_size,
              " exceeds int32 columns");
  key_padding_mask(op, mask, d.B, d.L, dev);
  return d;
}

inline void lsh_attention_grads(const char* op, const LSHDims& d, const at::Tensor& qk, const at::Tensor& dout,
                                const at::Tensor& lse_max, const at::Tensor& lse_log, const at::Tensor& out,
                                const std::optional<at::Tensor>& dlse) {
  const at::Device dev = qk.device();
  floating(op, "dout", dout, 4, dev);
  shape(op, "dout", dout, {d.B, d.H, d.L, d.Dv});
  floating(op, "out", out, 4, dev);
  shape(op, "out", out, {d.B, d.H, d.L, d.Dv});
  floating(op, "lse_max", lse_max, 3, dev);
  shape(op, "lse_max", lse_max, {d.B, d.H, d.L});
  floating(op, "lse_log", lse_log, 3, dev);
  shape(op, "lse_log", lse_log, {d.B, d.H, d.L});
  if (dlse.has_value()) {
    floating(op, "dlse", *dlse, 3, dev);
    shape(op, "dlse", *dlse, {d.B, d.H, d.L});
  }
}

}  // namespace longkernels::checks
