"""Benchmark cases and the implementations they compare, defined once.

Used by the engine (``longkernels bench``, ``bench/engine.py``) and by the pytest-benchmark suites
(``bench/bench_*.py``). An operation is a list of cases plus the implementations that can run them; the
engine knows nothing else about it, so a new capability (LSH attention, reversible stacks) adds an
``Operation`` to ``OPERATIONS`` here and changes nothing in the engine.

What the engine relies on:

* a case has ``op``, ``mode`` (``"fwd"`` or ``"fwdbwd"``), ``dtype``, ``variant``, ``sweep`` (the x of
  the curves) and ``sweep_name``, ``id``, ``shape``, ``flops()`` (useful FLOPs, docs/performance.md; None
  where only time is reported) and ``make_inputs(device, seed)`` (a dict of fresh random tensors, the
  differentiable ones requiring grad when ``mode == "fwdbwd"``);
* an implementation has ``name``, ``peer`` (longkernels is compared against it), ``reasons(case, device)``
  (why it cannot run; empty when it can) and ``build(case, device)``, which does the untimed per-shape
  setup (masks, compilation) and returns ``fn(**inputs) -> Tensor`` (or a tuple of tensors; a ``zero_grad``
  attribute on ``fn`` is called between steps, for implementations holding parameters), and ``comparable``
  (False: computes another function on purpose, e.g. dense attention beside LSH attention, and is not
  checked against the reference).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

import longkernels
from longkernels.ops.memory_attention import not_supported_reasons
from longkernels.reference.memory_attention import visible_mask

MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
# FlashAttention's convention (docs/performance.md): backward costs about 2.5 forwards.
FWDBWD_FACTOR = 3.5


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ============================================================================================
# Memory-segment attention (docs/semantics.md §1)
# ============================================================================================
def visible_pairs(n: int, m: int, *, causal: bool, window: Optional[int]) -> int:
    """Query-key pairs the mask leaves: query i (position m + i) sees keys lo..hi."""
    total = 0
    for i in range(n):
        hi = m + i if causal else m + n - 1
        lo = max(0, m + i - window + 1) if window else 0
        total += max(0, hi - lo + 1)
    return total


@dataclasses.dataclass(frozen=True)
class MemoryAttentionCase:
    mode: str
    dtype: torch.dtype
    N: int
    M: int
    B: int = 1
    H: int = 8
    Hkv: int = 8
    D: int = 64
    causal: bool = True
    window: Optional[int] = None
    variant: str = "causal"

    op: ClassVar[str] = "memory_attention"
    sweep_name: ClassVar[str] = "sequence length N (= memory M)"

    @property
    def sweep(self) -> int:
        return self.N

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{self.mode}-{dtype_name(self.dtype)}-N{self.N}-M{self.M}"

    @property
    def shape(self) -> str:
        heads = f"H{self.H}" if self.Hkv == self.H else f"H{self.H}/{self.Hkv}"
        s = f"B{self.B} {heads} N{self.N} M{self.M} D{self.D}"
        s += " causal" if self.causal else " full"
        return s + (f" w{self.window}" if self.window else "")

    def pairs(self) -> int:
        return visible_pairs(self.N, self.M, causal=self.causal, window=self.window)

    def flops(self) -> float:
        # two products per visible pair and head: Q K^T (2 D) and P V (2 Dv), Dv = D here
        fwd = 4 * self.D * self.pairs() * self.B * self.H
        return fwd * FWDBWD_FACTOR if self.mode == "fwdbwd" else float(fwd)

    def make_inputs(self, device, seed: int) -> dict:
        """Standard-normal q, k, v, mem_k, mem_v (never zeros); all require grad for fwd+bwd.

        Memory requires grad too (the function lets it; Transformer-XL's module detaches it), so that
        fwd+bwd is the full backward the 3.5x convention counts, for every implementation alike.
        """
        g = torch.Generator().manual_seed(seed)
        grad = self.mode == "fwdbwd"

        def rnd(heads, length):
            t = torch.randn(self.B, heads, length, self.D, generator=g)
            return t.to(device=device, dtype=self.dtype).requires_grad_(grad)

        return dict(q=rnd(self.H, self.N), k=rnd(self.Hkv, self.N), v=rnd(self.Hkv, self.N),
                    mem_k=rnd(self.Hkv, self.M), mem_v=rnd(self.Hkv, self.M))


def memory_attention_cases(lengths: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str],
                           variants: Sequence[str]) -> list:
    """Causal at every length (N = M); the windowed (w = N/4) and GQA (8 query heads on 2 kv heads)
    cases at the largest length only."""
    top = max(lengths)
    cases = []
    for mode in modes:
        for dtype in dtypes:
            if "causal" in variants:
                cases += [MemoryAttentionCase(mode, dtype, N=n, M=n) for n in sorted(lengths)]
            if "window" in variants:
                cases.append(MemoryAttentionCase(mode, dtype, N=top, M=top, window=max(1, top // 4),
                                                 variant="window"))
            if "gqa" in variants:
                cases.append(MemoryAttentionCase(mode, dtype, N=top, M=top, Hkv=2, variant="gqa"))
    return cases


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------
class Implementation:
    name: str = "?"
    peer: bool = True
    note: str = ""
    # False: computes something else on purpose (dense attention as a peer of LSH attention); the engine
    # does not check its output against the reference.
    comparable: bool = True
    # Per-dtype tolerances of the engine's agreement check that this implementation widens (documented
    # where set); the engine's AGREE_TOL otherwise.
    agree_tol: ClassVar[dict] = {}

    def reasons(self, case, device: torch.device) -> list[str]:
        return []

    def build(self, case, device: torch.device) -> Callable:
        raise NotImplementedError


class Longkernels(Implementation):
    """``longkernels.memory_attention(..., backend=name)``; ``reference`` counts as a peer."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = "reference" if backend == "reference" else f"longkernels-{backend}"
        self.peer = backend == "reference"
        self.note = f"longkernels.memory_attention(backend={backend!r})"

    def reasons(self, case, device):
        if self.backend == "triton" and device.type != "cuda":
            # TRITON_INTERPRET=1 runs it on CPU tensors: a correctness tool, not something to time.
            return ["Triton is benchmarked on CUDA tensors only (on CPU it runs under the interpreter)"]
        probe_q = torch.empty(1, case.H, 1, case.D, device=device, dtype=case.dtype)
        return not_supported_reasons(self.backend, probe_q, probe_q)

    def build(self, case, device):
        backend, causal, window = self.backend, case.causal, case.window

        def fn(q, k, v, mem_k, mem_v):
            return longkernels.memory_attention(q, k, v, mem_k, mem_v, causal=causal, window=window,
                                                backend=backend)
        return fn


def _cat_kv(k, v, mem_k, mem_v):
    return torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)


_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa


def _sdpa_gqa(case, device, *, masked: bool):
    """How a user groups kv heads for SDPA: ``enable_gqa`` where the kernel that will run takes it,
    else ``repeat_interleave``. (CUDA's memory-efficient kernel, the one that takes a mask, has no GQA.)"""
    if case.Hkv == case.H:
        return False, 1
    if _SDPA_HAS_GQA and not (masked and device.type == "cuda"):
        return True, 1
    return False, case.H // case.Hkv


class SdpaMask(Implementation):
    name = "sdpa_mask"
    note = "SDPA over cat(mem, cur) with an explicit boolean (N, M+N) mask, built once per shape"

    def build(self, case, device):
        mask = visible_mask(case.N, case.M, causal=case.causal, window=case.window, device=device)
        gqa, rep = _sdpa_gqa(case, device, masked=True)

        def fn(q, k, v, mem_k, mem_v):
            K, V = _cat_kv(k, v, mem_k, mem_v)
            if rep > 1:
                K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
            kw = {"enable_gqa": True} if gqa else {}
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, **kw)
        return fn


class SdpaLowerRight(Implementation):
    name = "sdpa_lower_right"
    note = "SDPA over cat(mem, cur) with torch.nn.attention.bias.causal_lower_right"

    def reasons(self, case, device):
        if not case.causal or case.window:
            return ["causal_lower_right expresses plain causal masks only (no window, not non-causal)"]
        return []

    def build(self, case, device):
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(case.N, case.M + case.N)
        gqa, rep = _sdpa_gqa(case, device, masked=False)

        def fn(q, k, v, mem_k, mem_v):
            K, V = _cat_kv(k, v, mem_k, mem_v)
            if rep > 1:
                K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
            kw = {"enable_gqa": True} if gqa else {}
            return F.scaled_dot_product_attention(q, K, V, attn_mask=bias, **kw)
        return fn


class SdpaTiled(Implementation):
    """The best a user can do by hand: one SDPA call per query tile on only the keys that tile can see,
    with a mask only where the tile cuts the diagonal or the window edge. The tile size is tuned per
    shape when the implementation is built (untimed), as a careful user would."""

    name = "sdpa_tiled"
    note = ("SDPA per query tile on the visible key slice, mask only on diagonal/window tiles; tile tuned per "
            "shape over 256..2048")

    def __init__(self, tiles: Sequence[int] = (256, 512, 1024, 2048)):
        self.tiles = tuple(tiles)

    def _make(self, case, device, tile):
        full = visible_mask(case.N, case.M, causal=case.causal, window=case.window, device=device)
        gqa, rep = _sdpa_gqa(case, device, masked=True)
        kw = {"enable_gqa": True} if gqa else {}
        tiles = []
        for i0 in range(0, case.N, tile):
            i1 = min(case.N, i0 + tile)
            rows = full[i0:i1]
            cols = rows.any(dim=0).nonzero().flatten()
            lo, hi = int(cols[0]), int(cols[-1]) + 1
            mask = rows[:, lo:hi].contiguous()
            tiles.append((i0, i1, lo, hi, None if bool(mask.all()) else mask))

        def fn(q, k, v, mem_k, mem_v):
            K, V = _cat_kv(k, v, mem_k, mem_v)
            if rep > 1:
                K, V = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
            outs = [F.scaled_dot_product_attention(q[:, :, i0:i1], K[:, :, lo:hi], V[:, :, lo:hi],
                                                   attn_mask=mask, **kw)
                    for i0, i1, lo, hi, mask in tiles]
            return torch.cat(outs, dim=2)

        fn.info = {"tile": tile}
        return fn

    def build(self, case, device):
        candidates = [t for t in self.tiles if t < case.N] or [case.N]
        if len(candidates) == 1:
            return self._make(case, device, candidates[0])
        # Forward on throwaway inputs: one call to warm up, the better of two to choose.
        inputs = {name: t.detach() for name, t in case.make_inputs(device, seed=12345).items()}
        best = None
        for tile in candidates:
            fn = self._make(case, device, tile)
            times = []
            with torch.no_grad():
                for _ in range(3):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    fn(**inputs)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
            if best is None or min(times[1:]) < best[0]:
                best = (min(times[1:]), fn)
        return best[1]


class Flex(Implementation):
    name = "flex"
    note = "torch.compile(flex_attention) with the equivalent create_block_mask(mask_mod)"

    def reasons(self, case, device):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return [f"FlexAttention is not importable ({exc})"]
        if case.mode == "fwdbwd" and device.type == "cpu":
            return ["n/a: FlexAttention has no backward on CPU (torch raises NotImplementedError)"]
        return []

    def build(self, case, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        M, causal, window = case.M, case.causal, case.window

        def mask_mod(b, h, q_idx, kv_idx):
            qpos = q_idx + M
            visible = kv_idx <= qpos if causal else kv_idx >= 0
            if window:
                visible = visible & (kv_idx > qpos - window)
            return visible

        # Every case is a new shape: start from a clean dynamo cache instead of piling up recompiles
        # until the cache limit silently sends the call back to eager.
        torch._dynamo.reset()
        block_mask = create_block_mask(mask_mod, None, None, case.N, case.M + case.N, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        gqa = case.Hkv != case.H

        def fn(q, k, v, mem_k, mem_v):
            K, V = _cat_kv(k, v, mem_k, mem_v)
            return compiled(q, K, V, block_mask=block_mask, enable_gqa=gqa)
        return fn


class FlashAttn(Implementation):
    name = "flash_attn"
    note = "flash_attn.flash_attn_func (bottom-right causal, window_size=(w-1, 0)) on cat(mem, cur)"

    def reasons(self, case, device):
        reasons = []
        if importlib.util.find_spec("flash_attn") is None:
            reasons.append("flash_attn is not installed")
        if device.type != "cuda":
            reasons.append("flash_attn runs on CUDA tensors only")
        if case.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"flash_attn takes float16/bfloat16, not {dtype_name(case.dtype)}")
        return reasons

    def build(self, case, device):
        from flash_attn import flash_attn_func

        left = case.window - 1 if case.window else -1
        right = 0 if case.causal else -1
        causal = case.causal

        def fn(q, k, v, mem_k, mem_v):
            K, V = _cat_kv(k, v, mem_k, mem_v)
            out = flash_attn_func(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), causal=causal,
                                  window_size=(left, right))
            return out.transpose(1, 2)
        return fn


# ============================================================================================
# LSH attention (docs/semantics.md §2): layers against layers
# ============================================================================================
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


def _module_fn(forward, module: torch.nn.Module, case) -> Callable:
    module.requires_grad_(case.mode == "fwdbwd")  # forward-only cases build no autograd graph

    def fn(x):
        return forward(x)
    fn.zero_grad = module.zero_grad  # the engine clears parameter grads between steps
    return fn


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
        return _module_fn(module, module, case)


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
        return _module_fn(lambda x: output(attn(x).hidden_states), layer, case)


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
        return _module_fn(forward, params, case)


# ============================================================================================
# Registry
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class Operation:
    name: str
    make_cases: Callable[[Sequence[int], Sequence[torch.dtype], Sequence[str], Sequence[str]], list]
    implementations: tuple
    default_sweep: tuple
    quick_sweep: tuple
    variants: tuple
    default_dtypes: tuple = ("float32", "bfloat16")
    cuda_sweep: Optional[tuple] = None  # default sweep on a GPU, where it differs
    flops_note: str = ("attention: 4*D per visible query-key pair and head (fwd), fwd+bwd = 3.5x fwd "
                       "(docs/performance.md)")


OPERATIONS = {
    "memory_attention": Operation(
        name="memory_attention",
        make_cases=memory_attention_cases,
        implementations=(Longkernels("cpu"), Longkernels("cuda"), Longkernels("triton"), Longkernels("reference"),
                         SdpaMask(), SdpaLowerRight(), SdpaTiled(), Flex(), FlashAttn()),
        default_sweep=(512, 1024, 2048, 4096),
        quick_sweep=(128, 256),
        variants=("causal", "window", "gqa"),
    ),
    "lsh_attention": Operation(
        name="lsh_attention",
        make_cases=lsh_attention_cases,
        implementations=(LSHModule("cpu"), LSHModule("triton"), LSHModule("reference"), HFReformer(),
                         DenseCausalSdpa()),
        default_sweep=(1024, 2048, 4096, 8192, 16384, 32768),
        cuda_sweep=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
        quick_sweep=(128, 256),
        variants=("causal", "op"),
        flops_note=("layer (variant causal): attention 4*D*n_hashes*L*W per head (W = (1+before+after)*chunk, "
                    "the pairs the chunk windows compute) + projections 3*2*L*E^2; fwd+bwd = 3.5x attention + 3x "
                    "projections; the same count for every implementation, dense attention included; variant op: "
                    "the attention term alone (LSHAttentionCase.flops)"),
    ),
}


def select_cases(op: Operation, *, quick: bool = False, sweep: Optional[Sequence[int]] = None,
                 dtypes: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                 variants: Optional[Sequence[str]] = None, device: Optional[torch.device] = None) -> list:
    default = op.cuda_sweep if (device is not None and torch.device(device).type == "cuda" and op.cuda_sweep) \
        else op.default_sweep
    sweep = tuple(sweep) if sweep else (op.quick_sweep if quick else default)
    dtypes = [DTYPES[d] for d in (dtypes or op.default_dtypes)]
    modes = tuple(modes or MODES)
    variants = tuple(variants or op.variants)
    unknown = [m for m in modes if m not in MODES] + [v for v in variants if v not in op.variants]
    if unknown:
        raise ValueError(f"unknown modes/variants for {op.name}: {unknown}; "
                         f"modes: {MODES}, variants: {op.variants}")
    return op.make_cases(sweep, dtypes, modes, variants)
