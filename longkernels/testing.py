"""Parity machinery shared by the test suite and ``longkernels check``.

Tolerances live here and only here.

* float64: every fast path must match the float64 reference to ``FLOAT64_RTOL`` in relative norm
  (``||x - ref|| / ||ref||``). Both compute the same sums in another order, so the gap is round-off
  of a few ulps times the length of the sums: 1e-10 leaves four orders of magnitude of margin and
  still catches any real bug (a wrong mask or a missing term is an O(1) error).
* float32, bfloat16, float16: FlashAttention's rule. Two errors are measured against the float64
  reference computed on the same (already rounded) inputs: the kernel's, and that of the reference
  run in the low precision itself (upcast compute, output rounded to the dtype, as a user of plain
  PyTorch would get). The kernel may be at most ``LOWP_FACTOR`` times worse, plus a floor
  ``LOWP_FLOOR[dtype]`` for the cases where the low-precision reference happens to be exact
  (e.g. outputs that round identically). A kernel that rounds an intermediate to bfloat16 where it
  should not, or drops a rescale, fails this by an order of magnitude.

  Where it is tight: gradients that cancel. (1) Where a row sees one key or a few (a window of 1, a single
  key), the softmax gradient is exactly zero in the reference's formulation (``P (dP - sum P dP)`` with
  P = 1) but not in the kernels' (FlashAttention's ``delta = rowsum(dO * O)``, a separately rounded dot
  product), and what is left of dq and dk is the LSE's gradient, small against the terms that cancelled.
  (2) In bfloat16 the sinks' gradient of a head, ``sum_i p_sink_i (dlse_i - delta_i)``, takes delta from the
  output as stored (rounded to bfloat16, as FlashAttention does), while the reference's float32 sink logits
  get float32 internals; with one head the gradient is one sum whose terms can cancel. A random search on
  the CPU kernels (5,805 float64 comparisons, none over 1e-10; about 1,200 each in float32 and bfloat16)
  found 8 float32 cases of kind (1) over the rule by at most 1.9x (2.5-6.5e-6) and 4 bfloat16 cases of
  kind (2) (dsinks relative errors of 1.4-7.8e-2 against the 1e-2 floor; typically 1e-3). LSH attention
  (about 29,000 comparisons, float64 and float32): none in float64, 52 float32 dqk over by at most 2.1x,
  all of kind (1): sequences of two (each query masked from itself sees one key) or head dims of 1 (the
  keys' normalisation, x / |x|, has an exactly cancelling derivative there). The fixed matrix
  of the tests does not contain them; any real fault is orders of magnitude above the first kind and
  shows in every other quantity in the second.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional

import torch

FLOAT64_RTOL = 1e-10
LOWP_FACTOR = 2.0
# Relative-norm floors: a few units of the dtype's rounding (2^-24, 2^-8, 2^-11) times a safety
# factor for accumulation order in the tile products (float32 logits over D up to 128).
LOWP_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def case_seed(*parts) -> int:
    """A seed from a case's id (its parts' reprs): the same in every run and process (Python's ``hash`` of a
    string is salted per process), different for different cases. Tests print it on failure."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in norm; infinities where the reference has the same one (an LSE of -inf for a row
    that sees no key) match, any other non-finite value is an infinite error."""
    x, ref = x.double(), ref.double()
    same_inf = torch.isinf(ref) & (x == ref)
    if not (torch.isfinite(x) | same_inf).all():
        return float("inf")
    if same_inf.any():
        x, ref = x.masked_fill(same_inf, 0.0), ref.masked_fill(same_inf, 0.0)
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


@dataclasses.dataclass(frozen=True)
class Case:
    """One memory-attention problem. Inputs are drawn fresh from the seed each time."""
    B: int = 1
    H: int = 2
    Hkv: int = 2
    N: int = 33
    M: int = 17
    D: int = 16
    Dv: Optional[int] = None
    causal: bool = True
    window: Optional[int] = None
    alibi: bool = False
    strided: bool = False  # q, k, v as (B, L, H, D).transpose(1, 2) views
    mem: bool = True  # False: mem_k = mem_v = None
    # key_padding_mask: "left" / "right" (a run of padded keys at the start / end, its length varying
    # by batch row), "random" (a quarter of the keys), "rows" (the first keys padded so that the first
    # queries see nothing); None: no mask.
    padding: Optional[str] = None
    docs: int = 0  # document_ids with this many documents (random boundaries); 0: none
    softcap: Optional[float] = None
    sinks: bool = False  # random per-head sink logits, which receive a gradient

    def describe(self) -> str:
        dv = self.Dv or self.D
        parts = [f"B{self.B} H{self.H}/{self.Hkv} N{self.N} M{self.M if self.mem else '-'} D{self.D}/{dv}"]
        parts += [s for s, on in (("noncausal", not self.causal), (f"w{self.window}", self.window),
                                  ("alibi", self.alibi), ("strided", self.strided),
                                  (f"pad-{self.padding}", self.padding), (f"docs{self.docs}", self.docs),
                                  (f"cap{self.softcap}", self.softcap), ("sinks", self.sinks)) if on]
        return " ".join(parts)


def make_masks(case: Case, g: torch.Generator, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The case's key_padding_mask, document_ids, softcap and sinks (None where the case has none)."""
    L = (case.M if case.mem else 0) + case.N
    out = {"key_padding_mask": None, "document_ids": None, "softcap": case.softcap, "sinks": None}
    if case.padding is not None:
        pos = torch.arange(L).unsqueeze(0)
        n = torch.randint(0, max(1, L // 3) + 1, (case.B, 1), generator=g)
        if case.padding == "left":
            mask = pos < n
        elif case.padding == "right":
            mask = pos >= L - n
        elif case.padding == "random":
            mask = torch.rand(case.B, L, generator=g) < 0.25
        elif case.padding == "rows":
            mask = (pos < (case.M if case.mem else 0) + min(3, case.N)).expand(case.B, L)
        else:
            raise ValueError(f"unknown padding {case.padding!r}")
        out["key_padding_mask"] = mask.to(device)
    if case.docs:
        ids = torch.zeros(case.B, L, dtype=torch.int64)
        for b in range(case.B):
            cuts = torch.randperm(max(L - 1, 1), generator=g)[: case.docs - 1] + 1
            for c in cuts.tolist():
                ids[b, c:] += 1
        out["document_ids"] = ids.to(device)
    if case.sinks:
        sink_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the LSE's dtype
        out["sinks"] = torch.randn(case.H, generator=g, dtype=torch.float64).to(sink_dtype).to(device)
    return out


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Random q, k, v, mem_k, mem_v, alibi slopes, and the output/LSE cotangents."""
    g = torch.Generator().manual_seed(seed)
    dv = case.Dv or case.D

    def rnd(b, h, n, d):
        if case.strided:  # a (B, L, H, D) buffer seen as (B, H, L, D): non-contiguous, no copy
            t = torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype).to(device).transpose(1, 2)
        else:
            t = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype).to(device)
        return t

    q = rnd(case.B, case.H, case.N, case.D)
    k = rnd(case.B, case.Hkv, case.N, case.D)
    v = rnd(case.B, case.Hkv, case.N, dv)
    mem_k = rnd(case.B, case.Hkv, case.M, case.D) if case.mem else None
    mem_v = rnd(case.B, case.Hkv, case.M, dv) if case.mem else None
    slopes = (torch.rand(case.H, generator=g, dtype=torch.float64) * 0.5).float().to(device) if case.alibi else None
    dout = torch.randn(case.B, case.H, case.N, dv, generator=g, dtype=torch.float64).to(dtype).to(device)
    dlse = torch.randn(case.B, case.H, case.N, generator=g, dtype=torch.float64).to(device)
    return q, k, v, mem_k, mem_v, slopes, dout, dlse, make_masks(case, g, device, dtype)


GRAD_NAMES = ("dq", "dk", "dv", "dmem_k", "dmem_v")


def run(case: Case, inputs, *, backend: Optional[str], dtype: Optional[torch.dtype] = None,
        with_grad: bool = True) -> dict:
    """Runs memory_attention on ``inputs`` (cast to ``dtype``); returns out, lse and gradients.

    The loss is ``<out, dout> + <lse, dlse>``, so gradients through the LSE are exercised too.
    """
    from . import memory_attention

    q, k, v, mem_k, mem_v, slopes, dout, dlse, masks = inputs
    sinks = masks["sinks"]
    if dtype is not None:
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
        if mem_k is not None:
            mem_k, mem_v = mem_k.to(dtype), mem_v.to(dtype)
        if slopes is not None and dtype == torch.float64:
            slopes = slopes.double()
        if sinks is not None and dtype == torch.float64:
            sinks = sinks.double()
    leaves = [t.detach().requires_grad_(with_grad) if t is not None else None
              for t in (q, k, v, mem_k, mem_v, sinks)]
    out, lse = memory_attention(*leaves[:5], causal=case.causal, window=case.window, alibi_slopes=slopes,
                                key_padding_mask=masks["key_padding_mask"], document_ids=masks["document_ids"],
                                softcap=masks["softcap"], sinks=leaves[5], return_lse=True, backend=backend)
    result = {"out": out.detach(), "lse": lse.detach()}
    if with_grad:
        # -inf LSEs (rows that see no key) carry no gradient; keep the loss finite.
        loss = (out * dout.to(out.dtype)).sum() + torch.where(torch.isinf(lse), 0.0, lse * dlse.to(lse.dtype)).sum()
        names = [n for n, t in zip(GRAD_NAMES + ("dsinks",), leaves) if t is not None]
        grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
        for name, grad in zip(names, grads):
            result[name] = grad
    return result


def compare(case, backend: str, dtype: torch.dtype, *, device="cpu", seed: int = 0,
            with_grad: bool = True) -> list[tuple[str, float, float, bool]]:
    """Backend against the reference on fresh inputs drawn from ``seed``, for a memory-attention ``Case`` or
    an ``LSHCase``: rows of (quantity, error, allowed, ok) under the rules at the top of this module."""
    make, go = (make_lsh_inputs, run_lsh) if isinstance(case, LSHCase) else (make_inputs, run)
    inputs = make(case, dtype, device, seed)
    truth = go(case, inputs, backend="reference", dtype=torch.float64, with_grad=with_grad)
    got = go(case, inputs, backend=backend, with_grad=with_grad)
    lowp = None if dtype == torch.float64 else go(case, inputs, backend="reference", with_grad=with_grad)
    return _rows(truth, got, lowp, dtype)


# --------------------------------------------------------------------------------------------
# LSH attention (same tolerance rules as above).
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LSHCase:
    """One LSH-attention problem. Inputs (and rotations) are drawn fresh from the seed each time."""
    B: int = 1
    H: int = 2
    L: int = 40
    D: int = 16
    Dv: Optional[int] = None
    chunk_size: int = 8
    n_hashes: int = 2
    n_buckets: object = 4  # an int, or a tuple of factors
    causal: bool = False
    before: int = 1
    after: int = 0
    padding: bool = False  # a random key_padding_mask
    strided: bool = False  # qk, v as (B, L, H, D).transpose(1, 2) views

    def describe(self) -> str:
        dv = self.Dv or self.D
        parts = [f"B{self.B} H{self.H} L{self.L} D{self.D}/{dv} C{self.chunk_size} r{self.n_hashes} "
                 f"nb{self.n_buckets} w-{self.before}+{self.after}"]
        parts += [s for s, on in (("causal", self.causal), ("pad", self.padding), ("strided", self.strided)) if on]
        return " ".join(parts)


LSH_GRAD_NAMES = ("dqk", "dv")


def make_lsh_inputs(case: LSHCase, dtype: torch.dtype, device="cpu", seed: int = 0):
    """qk, v, rotations, key_padding_mask and the output/LSE cotangents."""
    g = torch.Generator().manual_seed(seed)
    dv = case.Dv or case.D

    def rnd(d):
        if case.strided:
            return torch.randn(case.B, case.L, case.H, d, generator=g, dtype=torch.float64).to(dtype).to(
                device).transpose(1, 2)
        return torch.randn(case.B, case.H, case.L, d, generator=g, dtype=torch.float64).to(dtype).to(device)

    qk, v = rnd(case.D), rnd(dv)
    from .reference.lsh_attention import rotation_columns
    rotations = torch.randn(case.H, case.D, case.n_hashes, rotation_columns(case.n_buckets), generator=g).to(device)
    mask = None
    if case.padding:
        mask = (torch.rand(case.B, case.L, generator=g) < 0.25).to(device)
    dout = torch.randn(case.B, case.H, case.L, dv, generator=g, dtype=torch.float64).to(dtype).to(device)
    dlse = torch.randn(case.B, case.H, case.L, generator=g, dtype=torch.float64).to(device)
    return qk, v, rotations, mask, dout, dlse


def run_lsh(case: LSHCase, inputs, *, backend: Optional[str], dtype: Optional[torch.dtype] = None,
            with_grad: bool = True) -> dict:
    """Runs lsh_attention on ``inputs`` (cast to ``dtype``); loss ``<out, dout> + <lse, dlse>``."""
    from . import lsh_attention

    qk, v, rotations, mask, dout, dlse = inputs
    if dtype is not None:
        qk, v, dout = qk.to(dtype), v.to(dtype), dout.to(dtype)
    qk = qk.detach().requires_grad_(with_grad)
    v = v.detach().requires_grad_(with_grad)
    out, lse = lsh_attention(qk, v, n_hashes=case.n_hashes, chunk_size=case.chunk_size, n_buckets=case.n_buckets,
                             causal=case.causal, rotations=rotations, n_chunks_before=case.before,
                             n_chunks_after=case.after, key_padding_mask=mask, return_lse=True, backend=backend)
    result = {"out": out.detach(), "lse": lse.detach()}
    if with_grad:
        loss = (out * dout.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum()
        for name, grad in zip(LSH_GRAD_NAMES, torch.autograd.grad(loss, (qk, v))):
            result[name] = grad
    return result


def _rows(truth: dict, got: dict, lowp: Optional[dict], dtype: torch.dtype):
    rows = []
    for name, ref in truth.items():
        err = rel_err(got[name], ref)
        allowed = FLOAT64_RTOL if lowp is None else LOWP_FACTOR * rel_err(lowp[name], ref) + LOWP_FLOOR[dtype]
        rows.append((name, err, allowed, err <= allowed))
    return rows


def failures(truth: dict, got: dict, lowp: Optional[dict], dtype: torch.dtype) -> list:
    """``"name: err ... > allowed ..."`` for every entry of ``got`` outside the tolerance rule (this module's
    docstring) against ``truth`` (float64 reference) and ``lowp`` (the reference in ``dtype``; None for float64)."""
    return [f"{name}: err {err:.2e} > {allowed:.2e}" for name, err, allowed, ok in _rows(truth, got, lowp, dtype)
            if not ok]


# --------------------------------------------------------------------------------------------
# Activation memory
# --------------------------------------------------------------------------------------------
def saved_tensor_bytes(fn, *args, exclude=(), **kwargs) -> int:
    """Bytes saved for backward while ``fn(*args, **kwargs)`` runs (``saved_tensors_hooks``): distinct
    storages, those of the tensors in ``exclude`` (inputs, parameters) left out. Tensors without a plain
    storage (subclasses) count by their own size."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in skip:
            seen[key] = nbytes
        # The storage stays alive until the graph goes (a freed one could be reused at the same address and
        # counted once for two tensors), but not the tensor itself: a node that saves its own output would
        # then hold a tensor whose grad_fn is the node, a cycle through C++ that Python's collector cannot
        # see, and the whole graph (activations, parameters) outlived every call (3 GB a training step of
        # the HF benchmark's model). The detached alias shares the storage and has no grad_fn.
        return t.detach()

    def unpack(_):
        raise RuntimeError("saved_tensor_bytes only counts what the forward saves: no backward through its graph")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn(*args, **kwargs)
    del out
    return sum(seen.values())
