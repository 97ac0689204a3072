"""LSH-attention benchmark cases (docs/semantics.md §2) at two levels and the implementations they compare.

What users compare is a layer: Reformer's shared-QK LSH self-attention with its projections, against
HuggingFace's (the same computation, unfused) and against a dense causal attention layer of the same
width (variant ``causal``); variant ``op`` times the attention op alone against dense causal SDPA.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from .base import FWDBWD_FACTOR, Implementation, Operation, Sweep, dtype_name, module_fn

# What users compare is a layer: Reformer's shared-QK LSH self-attention with its projections, against
# HuggingFace's (the same computation, unfused) and against a dense causal attention layer of the same
# width. So the implementations below are modules over x (B, L, E = H * D), with the same weights (drawn
# from WEIGHT_SEED) and, for the two LSH layers, the same rotations (HuggingFace's own draw from
# HASH_SEED, handed to ours), so their outputs agree and the engine checks that they do.
HASH_SEED = 7
WEIGHT_SEED = 1234
# The reference materialises every gathered copy and every (chunk x window) score block, with autograd:
# past this length it only lengthens the run (HuggingFace is the unfused peer at every length).
LSH_REFERENCE_MAX_LEN = 8192
# Dense causal attention is O(L^2): on CPU one fwd+bwd step at L = 16384 already takes about ten
# seconds; beyond it the run would be spent on the peer LSH exists to avoid.
DENSE_CPU_MAX_LEN = 16384


@dataclasses.dataclass(frozen=True)
class LSHAttentionCase:
    mode: str
    dtype: torch.dtype
    L: int
    B: int = 1
    H: int = 8
    D: int = 64
    n_hashes: int = 2
    chunk_size: int = 64
    n_chunks_before: int = 1
    n_chunks_after: int = 0
    causal: bool = True
    variant: str = "causal"

    op: ClassVar[str] = "lsh_attention"
    sweep_name: ClassVar[str] = "sequence length L"

    @property
    def E(self) -> int:
        return self.H * self.D

    @property
    def n_buckets(self) -> int:
        """Passed explicitly to every implementation (HF would otherwise factorise large counts)."""
        from longkernels.reference.lsh_attention import default_n_buckets
        return default_n_buckets(self.L, self.chunk_size)

    @property
    def sweep(self) -> int:
        return self.L

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{self.mode}-{dtype_name(self.dtype)}-L{self.L}"

    @property
    def shape(self) -> str:
        s = (f"B{self.B} H{self.H} L{self.L} D{self.D} r{self.n_hashes} c{self.chunk_size} "
             f"nb{self.n_buckets}")
        return s + (" causal" if self.causal else " full")

    def pairs(self) -> int:
        """Query-key pairs the chunk windows compute, per (batch, head): every round, every query, the
        whole window (causal masking happens inside the window; docs/performance.md)."""
        from longkernels.reference.lsh_attention import padded_length
        window = self.chunk_size * (1 + self.n_chunks_before + self.n_chunks_after)
        return self.n_hashes * padded_length(self.L, self.chunk_size) * window

    @property
    def layer(self) -> bool:
        """``causal``: layers over x (projections included); ``op``: the causal attention op alone, over
        (qk, v) as a layer's projections lay them out (docs/performance.md)."""
        return self.variant != "op"

    def flops(self) -> float:
        """Useful FLOPs of the layer (the ``op`` variant: its attention term alone):

            attention (fwd)   = 4 * D * n_hashes * L * W * B * H,   W = (1 + before + after) * chunk_size
            projections (fwd) = 3 * 2 * B * L * E * E               (qk, v, out: no separate key projection)
            fwd               = attention + projections
            fwd+bwd           = 3.5 * attention + 3 * projections   (FlashAttention's 3.5x for attention;
                                                                   a linear layer's backward is dX + dW)

        The same count for every implementation of the case, dense attention included: its rate is the
        LSH layer's work per second (what a user compares), not the dense layer's own FLOP/s. The hash
        (2 * L * D * n_hashes * n_buckets / 2 per head) and the sort are not counted.
        """
        attention = 4 * self.D * self.pairs() * self.B * self.H
        projections = 3 * 2 * self.B * self.L * self.E * self.E if self.layer else 0
        if self.mode == "fwdbwd":
            return FWDBWD_FACTOR * attention + 3.0 * projections
        return float(attention + projections)

    def make_inputs(self, device, seed: int) -> dict:
        """Layers: standard-normal x (B, L, E) (weights are the modules' own). The op: standard-normal
        qk and v (B, H, L, D), each a transposed view of a (B, L, H, D) buffer, the layout a layer's
        projections give. Requires grad for fwd+bwd."""
        g = torch.Generator().manual_seed(seed)
        grad = self.mode == "fwdbwd"
        if self.layer:
            x = torch.randn(self.B, self.L, self.E, generator=g).to(device=device, dtype=self.dtype)
            return dict(x=x.requires_grad_(grad))
        qk, v = (torch.randn(self.B, self.L, self.H, self.D, generator=g).to(device=device, dtype=self.dtype)
                 .transpose(1, 2).requires_grad_(grad) for _ in range(2))
        return dict(qk=qk, v=v)


def lsh_attention_cases(lengths: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str],
                        variants: Sequence[str]) -> list:
    """Causal (a decoder layer: Reformer's language-model setting) at every length: ``causal``, layer
    against layer; ``op``, the attention op against dense causal SDPA, projections left out."""
    cases = []
    for variant in ("causal", "op"):
        if variant in variants:
            for mode in modes:
                for dtype in dtypes:
                    cases += [LSHAttentionCase(mode, dtype, L=n, variant=variant) for n in sorted(lengths)]
    return cases


def _lsh_weights(case: LSHAttentionCase, device) -> tuple:
    """qk, v, out projection weights (E, E), the same for every implementation of the case."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    return tuple((torch.randn(case.E, case.E, generator=g) / case.E ** 0.5).to(device=device, dtype=case.dtype)
                 for _ in range(3))


def lsh_rotations(case: LSHAttentionCase, device) -> torch.Tensor:
    """HuggingFace's draw (``torch.manual_seed(hash_seed); torch.randn(..., dtype=qk.dtype)`` on the
    device of qk), repeated, so that ours hashes with the rotations HF's layer uses."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(HASH_SEED)
        return torch.randn(case.H, case.D, case.n_hashes, case.n_buckets // 2, device=device, dtype=case.dtype)



class LSHModule(Implementation):
    """``longkernels.nn.LSHSelfAttention(backend=...)``: ``cpu`` on CPU, ``triton`` on CUDA;
    ``reference`` counts as a peer."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = "reference" if backend == "reference" else f"longkernels-{backend}"
        self.peer = backend == "reference"
        self.note = (f"layers: longkernels.nn.LSHSelfAttention(backend={backend!r}), eval, weights and rotations "
                     f"shared with hf_reformer; op: longkernels.lsh_attention(backend={backend!r})")

    def reasons(self, case, device):
        from longkernels.ops.lsh_attention import not_supported_reasons as lsh_reasons

        if self.backend == "triton" and device.type != "cuda":
            return ["Triton is benchmarked on CUDA tensors only (on CPU it runs under the interpreter)"]
        if self.backend == "reference" and case.L > LSH_REFERENCE_MAX_LEN:
            return [f"reference only up to L={LSH_REFERENCE_MAX_LEN}: it materialises every gathered copy and "
                    "score block with autograd (hf_reformer is the unfused peer at every length)"]
        probe = torch.empty(1, case.H, 1, case.D, device=device, dtype=case.dtype)
        return lsh_reasons(self.backend, probe, probe)

    def build(self, case, device):
        from longkernels import lsh_attention
        from longkernels.nn import LSHSelfAttention

        if not case.layer:
            rotations = lsh_rotations(case, device)

            def op(qk, v):
                return lsh_attention(qk, v, n_hashes=case.n_hashes, chunk_size=case.chunk_size, causal=case.causal,
                                     rotations=rotations, n_chunks_before=case.n_chunks_before,
                                     n_chunks_after=case.n_chunks_after, backend=self.backend)
            return op
        module = LSHSelfAttention(case.E, case.H, chunk_size=case.chunk_size, n_hashes=case.n_hashes,
                                  n_buckets=case.n_buckets, causal=case.causal,
                                  n_chunks_before=case.n_chunks_before, n_chunks_after=case.n_chunks_after,
                                  backend=self.backend, device=device, dtype=case.dtype).eval()
        with torch.no_grad():
            for lin, w in zip((module.qk_proj, module.v_proj, module.out_proj), _lsh_weights(case, device)):
                lin.weight.copy_(w)
        module.set_rotations(lsh_rotations(case, device))
        return module_fn(module, module, case)


class HFReformer(Implementation):
    name = "hf_reformer"
    note = ("transformers LSHSelfAttention + ReformerSelfOutput.dense (same config, n_buckets, weights, "
            "hash_seed rotations), eval, no dropout")
    # HF rounds lse = -1e5 + log(k) in float32 on rows whose only visible key is the token itself (causal
    # position 0, ...), losing about three digits there: ~1e-3 relative on the whole output at short
    # lengths (tests/test_lsh_attention_hf.py measures it against float64). In bfloat16 it hashes in
    # bfloat16 (ours hashes in float32, docs/semantics.md §2), so many tokens land in other buckets and
    # the outputs differ by ~0.3-0.5 relative: there the check only catches garbage (NaN, unrelated
    # outputs are ~1.4 away); the float32 cases check the wiring.
    agree_tol: ClassVar[dict] = {torch.float32: 5e-3, torch.bfloat16: 1.0}

    def reasons(self, case, device):
        if not case.layer:
            return ["HF's LSH attention core is not callable apart from its qk and v projections: "
                    "compared layer against layer (variant causal)"]
        if importlib.util.find_spec("transformers") is None:
            return ["HuggingFace transformers is not installed"]
        if case.L % case.chunk_size:
            return [f"HF's LSHSelfAttention needs L a multiple of the chunk length {case.chunk_size}"]
        if case.L <= case.chunk_size:
            return ["HF runs full attention for L <= chunk length, not LSH"]
        return []

    def build(self, case, device):
        import transformers
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention, ReformerSelfOutput

        transformers.logging.set_verbosity_error()
        cfg = transformers.ReformerConfig(
            hidden_size=case.E, num_attention_heads=case.H, attention_head_size=case.D,
            lsh_attn_chunk_length=case.chunk_size, num_hashes=case.n_hashes, num_buckets=case.n_buckets,
            is_decoder=case.causal, lsh_num_chunks_before=case.n_chunks_before,
            lsh_num_chunks_after=case.n_chunks_after, hash_seed=HASH_SEED, lsh_attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0, max_position_embeddings=case.L, attn_layers=["lsh"])
        attn = LSHSelfAttention(cfg).to(device=device, dtype=case.dtype).eval()
        output = ReformerSelfOutput(cfg).to(device=device, dtype=case.dtype).eval()
        with torch.no_grad():
            for lin, w in zip((attn.query_key, attn.value, output.dense), _lsh_weights(case, device)):
                lin.weight.copy_(w)
        layer = torch.nn.ModuleList([attn, output])
        return module_fn(lambda x: output(attn(x).hidden_states), layer, case)


class DenseCausalSdpa(Implementation):
    name = "sdpa_dense_causal"
    note = ("dense causal attention layer of the same width: the same qk (shared, as in Reformer), v and out "
            "projections, SDPA(qk, qk, v, is_causal=True) over (B, H, L, D); op: that SDPA call alone")
    comparable = False  # another attention: its output is not expected to equal LSH's

    def reasons(self, case, device):
        if device.type == "cpu" and case.L > DENSE_CPU_MAX_LEN:
            return [f"dense causal attention is O(L^2): skipped on CPU above L={DENSE_CPU_MAX_LEN} "
                    "(about 10 s per fwd+bwd step at 16384 already)"]
        return []

    def build(self, case, device):
        if not case.layer:
            return lambda qk, v: F.scaled_dot_product_attention(qk, qk, v, is_causal=case.causal)
        wqk, wv, wo = (torch.nn.Parameter(w) for w in _lsh_weights(case, device))
        params = torch.nn.ParameterList([wqk, wv, wo])
        B, L, H, D, E = case.B, case.L, case.H, case.D, case.E

        def forward(x):
            qk = F.linear(x, wqk).view(B, L, H, D).transpose(1, 2)
            v = F.linear(x, wv).view(B, L, H, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(qk, qk, v, is_causal=case.causal)
            return F.linear(o.transpose(1, 2).reshape(B, L, E), wo)
        return module_fn(forward, params, case)


OPERATION = Operation(
    name="lsh_attention",
    make_cases=lsh_attention_cases,
    implementations=(LSHModule("cpu"), LSHModule("triton"), LSHModule("reference"), HFReformer(),
                     DenseCausalSdpa()),
    variants=("causal", "op"),
    sweeps={"quick": Sweep((128, 256)), "default": Sweep((1024, 4096), dtypes=("float32",)),
            "full": Sweep((1024, 2048, 4096, 8192, 16384, 32768))},
    cuda_sweeps={"default": Sweep((8192,), dtypes=("bfloat16",)),
                 "full": Sweep((1024, 2048, 4096, 8192, 16384, 32768, 65536))},
    flops_note=("layer (variant causal): attention 4*D*n_hashes*L*W per head (W = (1+before+after)*chunk, "
                "the pairs the chunk windows compute) + projections 3*2*L*E^2; fwd+bwd = 3.5x attention + 3x "
                "projections; the same count for every implementation, dense attention included; variant op: "
                "the attention term alone (LSHAttentionCase.flops)"),
)
