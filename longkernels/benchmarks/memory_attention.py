"""Memory-attention benchmark cases (docs/semantics.md §1) and the implementations they compare:
longkernels' backends, the reference, SDPA (explicit mask, ``causal_lower_right``, per visible tile),
FlexAttention and FlashAttention where installed."""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

import longkernels
from longkernels.ops.memory_attention import not_supported_reasons
from longkernels.reference.memory_attention import visible_mask

from .base import FWDBWD_FACTOR, Implementation, Operation, Sweep, dtype_name

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


OPERATION = Operation(
    name="memory_attention",
    make_cases=memory_attention_cases,
    implementations=(Longkernels("cpu"), Longkernels("cuda"), Longkernels("triton"), Longkernels("reference"),
                     SdpaMask(), SdpaLowerRight(), SdpaTiled(), Flex(), FlashAttn()),
    variants=("causal", "window", "gqa"),
    sweeps={"quick": Sweep((128, 256)), "default": Sweep((512, 1024)), "full": Sweep((512, 1024, 2048, 4096))},
    # On a GPU the default level is make gpu-check's short run (FlexAttention compiles once per case).
    cuda_sweeps={"default": Sweep((4096,), dtypes=("bfloat16",)),
                 "full": Sweep((1024, 2048, 4096, 8192, 16384), dtypes=("bfloat16", "float16"))},
)
