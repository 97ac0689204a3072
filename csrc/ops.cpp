// One schema per op. Implementations live in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA);
// fake (meta) implementations for torch.compile are registered from Python
// (longkernels/ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(longkernels, m) {
  // Memory-segment causal attention (docs/semantics.md §1). window == 0: no window.
  // Returns (out, lse); lse is float32 (float64 for float64 inputs), shape (B, H, N).
  m.def(
      "memory_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, "
      "Tensor? alibi_slopes, bool causal, int window, float scale) -> (Tensor, Tensor)");
  // delta = rowsum(dout * out) - dlse, in lse's dtype. Returns (dq, dk, dv, dmem_k, dmem_v).
  m.def(
      "memory_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor mem_k, Tensor mem_v, "
      "Tensor? alibi_slopes, Tensor lse, Tensor delta, bool causal, int window, float scale) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
