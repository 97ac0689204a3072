"""The LSH-attention Triton launchers (triton_kernels/lsh_attention.py) against the reference.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py switches it on), so the cases are
small. The permutation comes from the reference's own hash and sort; the forward is compared on out and
lse = lse_max + lse_log, the backward against autograd through the reference with the loss
<out, dout> + <lse, dlse>: dqk = dq + norm_backward(qk, dk), dv. float64 to 1e-10 (FLOAT64_RTOL),
float32 (compared with the float64 reference on the same values) to 1e-5.
"""
import dataclasses
import importlib
import os
import sys
from typing import Optional

import pytest
import torch

from longkernels.testing import FLOAT64_RTOL, case_seed, failures, rel_err

# The module (longkernels.reference re-exports its function under the same name).
ref = importlib.import_module("longkernels.reference.lsh_attention")

try:
    from longkernels.triton_kernels import lsh_attention as tk
except ImportError:  # an editable install made elsewhere: take the source tree's copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from triton_kernels import lsh_attention as tk

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and the Triton interpreter is off", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOAT32_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class LshCase:
    B: int = 1
    H: int = 2
    L: int = 40
    D: int = 32
    Dv: Optional[int] = None
    n_hashes: int = 1
    chunk_size: int = 16
    n_buckets: Optional[int] = None
    causal: bool = False
    before: int = 1
    after: int = 0
    kpm: bool = False  # random key_padding_mask (a few tokens, never all)
    strided: bool = False  # qk, v (and dout) as (B, L, H, D).transpose(1, 2) views
    scale: float = 1.0

    def describe(self) -> str:
        parts = [f"B{self.B}H{self.H} L{self.L} D{self.D}/{self.Dv or self.D} r{self.n_hashes} "
                 f"C{self.chunk_size} w{self.before}+{self.after}"]
        parts += [s for s, on in (("causal", self.causal), ("kpm", self.kpm), ("strided", self.strided),
                                  (f"s{self.scale}", self.scale != 1.0)) if on]
        return " ".join(parts)


CASES = [
    # one round, L not a multiple of the chunk, D = 32
    LshCase(L=40, D=32, n_hashes=1, causal=False),
    # several rounds, causal, chunk not a power of two, D not a power of two, Dv != D, look-ahead, padding
    LshCase(L=37, D=24, Dv=16, n_hashes=2, chunk_size=12, causal=True, before=1, after=1, kpm=True),
    # L smaller than one chunk (Lp = C, T = n_hashes), window (4 chunks) longer than T: chunks repeat
    LshCase(L=10, D=64, n_hashes=3, chunk_size=16, causal=True, before=2, after=1),
    # no look-back, look-ahead only; non-contiguous inputs; D = 128, Dv = 32; padding; scale
    LshCase(B=2, H=1, L=48, D=128, Dv=32, n_hashes=2, causal=False, before=0, after=1, kpm=True,
            strided=True, scale=0.7),
    # three rounds, two chunks back, causal, non-contiguous, batch of two
    LshCase(B=2, H=2, L=33, D=32, Dv=48, n_hashes=3, causal=True, before=2, after=0, strided=True),
    # one chunk in all (T = 1): every window slot is the same chunk
    LshCase(L=9, D=16, n_hashes=1, chunk_size=12, causal=False, before=2, after=1, kpm=True),
]


def _make(case: LshCase, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = case.B, case.H, case.L, case.D
    Dv = case.Dv or D

    def rnd(d):
        if case.strided:
            return torch.randn(B, L, H, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(B, H, L, d, generator=g, dtype=torch.float64).to(dtype)

    qk, v, dout = rnd(D), rnd(Dv), rnd(Dv)
    dlse = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    kpm = None
    if case.kpm:
        kpm = torch.rand(B, L, generator=g) < 0.25
        kpm[:, 0] = False  # position 0 stays a real key
    n_buckets = case.n_buckets or ref.default_n_buckets(L, case.chunk_size)
    rotations = ref.draw_rotations(H, D, case.n_hashes, n_buckets, generator=g)
    return qk, v, dout, dlse, kpm, n_buckets, rotations


def _perm(qk, kpm, rotations, n_buckets, chunk_size):
    """The reference's sorted order as the launchers take it: int32 (B, H, n_hashes, Lp) positions."""
    B, H, L, _ = qk.shape
    n_hashes = rotations.shape[2]
    Lp = ref.padded_length(L, chunk_size)
    pad = ref.padding_mask(B, L, Lp, kpm, qk.device)
    qk_p = torch.nn.functional.pad(qk.double(), (0, 0, 0, Lp - L))
    buckets = ref.lsh_hash(qk_p, rotations, pad)
    order = ref.lsh_sort(buckets, n_buckets, bool(pad.any()))
    return (order % Lp).view(B, H, n_hashes, Lp).int()


def _reference(case, qk, v, kpm, n_buckets, rotations, dout=None, dlse=None):
    """Reference out, lse in float64 (and dqk, dv by autograd when dout is given)."""
    qk64 = qk.detach().double().requires_grad_(dout is not None)
    v64 = v.detach().double().requires_grad_(dout is not None)
    out, lse = ref.lsh_attention(qk64, v64, n_hashes=case.n_hashes, chunk_size=case.chunk_size,
                                 n_buckets=n_buckets, causal=case.causal, rotations=rotations,
                                 n_chunks_before=case.before, n_chunks_after=case.after,
                                 key_padding_mask=kpm, scale=case.scale, return_lse=True)
    if dout is None:
        return out.detach(), lse.detach()
    loss = (out * dout.double()).sum() + (lse * dlse.double()).sum()
    dqk, dv = torch.autograd.grad(loss, (qk64, v64))
    return out.detach(), lse.detach(), dqk, dv


def norm_backward(qk: torch.Tensor, dk: torch.Tensor, eps: float = ref.NORM_EPS) -> torch.Tensor:
    """Gradient w.r.t. qk given the gradient dk w.r.t. k = qk * rsqrt(mean(qk^2) + eps) / sqrt(D):
    with r = rsqrt(mean(qk^2) + eps), dr/dqk = -r^3 qk / D, so
    dqk = (r dk - r^3 qk <dk, qk> / D) / sqrt(D)."""
    D = qk.shape[-1]
    r = torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps)
    dot = (dk * qk).sum(-1, keepdim=True)
    return (r * dk - r.pow(3) * qk * dot / D) / D ** 0.5


def _run_kernels(case, qk, v, perm, kpm, dout, dlse):
    out, lse_max, lse_log = tk.lsh_attention_fwd(qk, v, perm, kpm, case.chunk_size, case.before, case.after,
                                                 case.causal, case.scale)
    cdt = lse_max.dtype
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1) - dlse.to(cdt)
    dq, dk, dv = tk.lsh_attention_bwd(dout, qk, v, perm, kpm, lse_max, lse_log, delta, case.chunk_size,
                                      case.before, case.after, case.causal, case.scale)
    return out, lse_max, lse_log, dq, dk, dv


def _to_dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=LshCase.describe)
def test_forward_backward_match_reference(case, dtype):
    tol = FLOAT64_RTOL if dtype == torch.float64 else FLOAT32_RTOL
    qk, v, dout, dlse, kpm, n_buckets, rotations = _make(case, dtype, seed=case_seed(case, str(dtype)))
    perm = _perm(qk, kpm, rotations, n_buckets, case.chunk_size)
    out_r, lse_r, dqk_r, dv_r = _reference(case, qk, v, kpm, n_buckets, rotations, dout, dlse)

    qk_d, v_d, perm_d, kpm_d, dout_d, dlse_d = _to_dev(qk, v, perm, kpm, dout, dlse)
    out, lse_max, lse_log, dq, dk, dv = _run_kernels(case, qk_d, v_d, perm_d, kpm_d, dout_d, dlse_d)

    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == v.shape
    assert lse_max.dtype == cdt and lse_log.dtype == cdt and lse_max.shape == (case.B, case.H, case.L)
    for g, ref_shape in ((dq, qk.shape), (dk, qk.shape), (dv, v.shape)):
        assert g.dtype == cdt and g.shape == ref_shape and g.is_contiguous()

    dqk = dq.double() + norm_backward(qk_d.double(), dk.double())
    seen = lse_r > -1e4
    errs = {
        "out": rel_err(out.cpu(), out_r),
        "lse": rel_err((lse_max.double() + lse_log.double()).cpu(), lse_r),
        # Rows that see more than themselves alone: their lse, not swamped by the -1e5 rows' norm.
        "lse_seen": rel_err((lse_max.double() + lse_log.double()).cpu()[seen], lse_r[seen]),
        "dqk": rel_err(dqk.cpu(), dqk_r),
        "dv": rel_err(dv.cpu(), dv_r),
    }
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{case.describe()} {dtype} (seed {case_seed(case, str(dtype))}): errors {bad} > {tol:.0e} (all: {errs})"


def test_norm_backward_matches_autograd():
    g = torch.Generator().manual_seed(3)
    qk = torch.randn(2, 3, 7, 24, generator=g, dtype=torch.float64)
    qk[0, 0, 0] *= 1e-4  # near the eps
    dk = torch.randn(qk.shape, generator=g, dtype=torch.float64)
    x = qk.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((ref.normalize_keys(x) * dk).sum(), x)
    assert rel_err(norm_backward(qk, dk), want) < 1e-13


def _self_count(perm, chunk_size, before, after, pos=0):
    """(B, H): how many times ``pos`` sees itself over all rounds' windows (its w_r = l_r = count_r when
    it sees nothing else)."""
    B, H, n_hashes, Lp = perm.shape
    T = n_hashes * Lp // chunk_size
    chunks = perm.reshape(B, H, T, chunk_size)
    count = torch.zeros(B, H, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if (chunks[b, h, t] == pos).any():  # the query's own chunk, once per round
                    for o in range(-before, after + 1):
                        count[b, h] += int((chunks[b, h, (t + o) % T] == pos).sum())
    return count


def test_causal_position_zero_is_exact_in_float32():
    """Position 0 under causal masking sees only itself (logit -1e5): out = v[0] to float32 round-off,
    lse_max = -1e5 and lse_log = log(n) exactly (n: its self entries over the rounds), and dq[0] = 0.
    Kept exact by the two-part LSE: a single float32 lse = -1e5 + log(n) would carry an absolute error of
    up to ~4e-3, and P = exp(s - lse) as much relative error."""
    case = LshCase(B=1, H=2, L=21, D=16, n_hashes=2, chunk_size=8, causal=True, before=1, after=0)
    qk, v, dout, dlse, kpm, n_buckets, rotations = _make(case, torch.float32, seed=5)
    perm = _perm(qk, kpm, rotations, n_buckets, case.chunk_size)
    qk_d, v_d, perm_d, dout_d, dlse_d = _to_dev(qk, v, perm, dout, dlse)
    out, lse_max, lse_log, dq, dk, dv = _run_kernels(case, qk_d, v_d, perm_d, None, dout_d, dlse_d)
    torch.testing.assert_close(out[..., 0, :].cpu(), v[..., 0, :], rtol=3e-7, atol=0)
    assert (lse_max[..., 0] == -1e5).all()
    n = _self_count(perm, case.chunk_size, case.before, case.after).float()
    torch.testing.assert_close(lse_log[..., 0].cpu(), n.log(), rtol=2e-7, atol=0)
    # Its only entry is the self entry, whose dS is 0; every other entry has P = 0 exactly.
    assert (dq[..., 0, :] == 0).all()
    # Against the float64 reference the whole backward is float32-accurate, row 0 included.
    _, _, dqk_r, dv_r = _reference(case, qk, v, kpm, n_buckets, rotations, dout, dlse)
    dqk = dq.double() + norm_backward(qk_d.double(), dk.double())
    assert rel_err(dqk.cpu(), dqk_r) < FLOAT32_RTOL
    assert rel_err(dv.cpu(), dv_r) < FLOAT32_RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_inputs(dtype):
    """float16/bfloat16 inputs: the dot products take their operands in the input type (rows as stored; the
    normalised keys, P and dS rounded; float32 accumulation: FlashAttention's numerics, which put the products on
    a GPU's tensor cores), softmax and accumulators in float32. Held to the project's rule against the float64
    reference of the same (rounded) inputs, the low-precision reference being that reference rounded to the
    dtype (longkernels.testing)."""
    case = LshCase(L=30, D=32, Dv=16, n_hashes=2, chunk_size=16, causal=True, before=1, after=1, kpm=True)
    qk, v, dout, dlse, kpm, n_buckets, rotations = _make(case, dtype, seed=11)
    perm = _perm(qk, kpm, rotations, n_buckets, case.chunk_size)
    out_r, lse_r, dqk_r, dv_r = _reference(case, qk, v, kpm, n_buckets, rotations, dout, dlse)
    qk_d, v_d, perm_d, kpm_d, dout_d, dlse_d = _to_dev(qk, v, perm, kpm, dout, dlse)
    out, lse_max, lse_log, dq, dk, dv = _run_kernels(case, qk_d, v_d, perm_d, kpm_d, dout_d, dlse_d)
    assert out.dtype == dtype and lse_max.dtype == torch.float32 and dq.dtype == torch.float32
    truth = dict(out=out_r, lse=lse_r, dqk=dqk_r, dv=dv_r)
    lowp = {name: t.float() if name == "lse" else t.to(dtype) for name, t in truth.items()}
    dqk = dq.double() + norm_backward(qk_d.double(), dk.double())
    got = dict(out=out.cpu(), lse=(lse_max.double() + lse_log.double()).cpu(), dqk=dqk.cpu(), dv=dv.cpu())
    assert not failures(truth, got, lowp, dtype)
    # The products did take rounded operands: dv = P^T dO, with P rounded, is not float32-accurate.
    assert rel_err(dv.cpu(), dv_r) > FLOAT32_RTOL
