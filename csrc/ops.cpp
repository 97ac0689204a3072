// One schema per op. Implementations live in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA);
// fake (meta) implementations for torch.compile are registered from Python
// (longkernels/ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(longkernels, m) {
  // Memory-segment causal attention (docs/semantics.md §1). window == 0: no window.
  // key_padding_mask (B, M + N) bool, True = padding; document_ids (B, M + N) integer, non-decreasing;
  // softcap 0: none; sinks (H,) floating (the extra logit of every row's softmax).
  // Returns (out, lse); lse is float32 (float64 for float64 inputs), shape (B, H, N); a row with no
  // visible key gets out 0 and lse -inf (the sink's logit with sinks). q_offset (default M) places query i at
  // position q_offset + i, keys staying at 0 .. M + N - 1: one call computes any block pair of a ring
  // (docs/semantics.md §8); the CUDA kernels take only the default.
  m.def(
      "memory_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, "
      "Tensor? alibi_slopes, bool causal, int window, float scale, Tensor? key_padding_mask=None, "
      "Tensor? document_ids=None, float softcap=0., Tensor? sinks=None, int? q_offset=None) -> (Tensor, Tensor)");
  // delta = rowsum(dout * out) - dlse, in lse's dtype. Returns (dq, dk, dv, dmem_k, dmem_v). The sinks'
  // gradient, -sum_i exp(sink - lse_i) * delta_i, needs no kernel.
  m.def(
      "memory_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, "
      "Tensor? alibi_slopes, Tensor lse, Tensor delta, bool causal, int window, float scale, "
      "Tensor? key_padding_mask=None, Tensor? document_ids=None, float softcap=0., int? q_offset=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Transformer-XL relative positions (docs/semantics.md §9), causal, CPU only: q is q + content_bias, q_pos is
  // q + pos_bias, pos_emb (H, P, D) the projected embedding of each distance d = (M + i) - j at index d. Returns
  // (out, lse) as memory_attention_fwd; the backward (dq, dq_pos, dk, dv, dmem_k, dmem_v, dpos_emb).
  m.def(
      "memory_attention_rel_fwd(Tensor q, Tensor q_pos, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, "
      "Tensor pos_emb, bool causal, int window, float scale) -> (Tensor, Tensor)");
  m.def(
      "memory_attention_rel_bwd(Tensor dout, Tensor q, Tensor q_pos, Tensor k, Tensor v, Tensor mem_k, "
      "Tensor mem_v, Tensor pos_emb, Tensor lse, Tensor delta, bool causal, int window, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // LSH attention (docs/semantics.md §2). Hash and sort: buckets (B, H, n_hashes, Lp) int32 in
  // [0, n_buckets] (padding, i.e. key_padding_mask or position >= L, gets n_buckets) and perm
  // (B, H, n_hashes, Lp) int32, the original positions in sorted order: round r's items sorted by
  // (bucket, position), stable. rotations: (H, D, n_hashes, n_buckets / 2) float32.
  m.def(
      "lsh_hash_sort(Tensor qk, Tensor rotations, Tensor? key_padding_mask, int n_buckets, int padded_len, "
      "int[]? bucket_factors=None) -> (Tensor, Tensor)");
  // Attend over chunks of the sorted sequence perm.flatten(2) with look-around, and combine the
  // rounds. Returns (out (B, H, L, Dv) in v's dtype, lse_max, lse_log), the last two (B, H, L) in
  // the compute dtype (float64 for float64, else float32): lse = lse_max + lse_log, kept apart so
  // that rows whose logits sit near the -1e5 self-mask value keep float32 precision.
  m.def(
      "lsh_attention_fwd(Tensor qk, Tensor v, Tensor perm, Tensor? key_padding_mask, int chunk_size, "
      "int n_chunks_before, int n_chunks_after, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
  // out: the forward's output; dlse: the LSE's gradient, if any (delta = rowsum(dout * out) - dlse
  // is formed inside, in one pass). Returns (dqk, dv) in the compute dtype, at original positions,
  // summed over rounds: dqk through qk as queries and, by the chain through the key normalisation,
  // as keys. Outputs (here and in the forward) take their input's memory layout.
  m.def(
      "lsh_attention_bwd(Tensor dout, Tensor qk, Tensor v, Tensor perm, Tensor? key_padding_mask, "
      "Tensor lse_max, Tensor lse_log, Tensor out, Tensor? dlse, int chunk_size, int n_chunks_before, "
      "int n_chunks_after, bool causal, float scale) -> (Tensor, Tensor)");

  // Coupling arithmetic of a reversible block's backward step (longkernels/reversible.py), one
  // pass: x = y - fy.to(y.dtype), dy_out = dy + dgrad.to(dy.dtype). y and dy: the float32/float64
  // stream; fy and dgrad: any float dtype. Bitwise the torch expressions. Returns (x, dy_out).
  m.def("reversible_coupling(Tensor y, Tensor fy, Tensor dy, Tensor dgrad) -> (Tensor, Tensor)");
  // The same with dy_out written into dy (which the caller owns). Returns x.
  m.def("reversible_coupling_(Tensor y, Tensor fy, Tensor(a!) dy, Tensor dgrad) -> Tensor");
}
