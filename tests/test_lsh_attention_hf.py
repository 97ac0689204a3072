"""LSH attention against HuggingFace ``transformers``' Reformer ``LSHSelfAttention`` (docs/semantics.md §2).

HuggingFace reproduces trax's Reformer output for output, so it is the anchor of the semantics:

(a) the reference against HF's attention core in float64 (causal or not, 1/2/3 rounds, padding at the
    end and at the start, look-ahead chunks, HF's standard-attention path for L <= chunk length):
    outputs and gradients of qk and v to 1e-10 relative, buckets equal;
(b) the same in float32 under the low-precision rule of ``longkernels/testing.py``: the float64 truth is
    HF's layer in float64 on the float32 inputs, given HF's own float32 buckets (HF's forward takes
    ``buckets=``), and our error may be at most ``LOWP_FACTOR`` times HF's float32 error plus
    ``LOWP_FLOOR``. (HF loses about three digits on rows whose only visible key is the token itself,
    where it computes ``lse = -1e5 + log(k)`` in float32; the reference keeps max and sum apart.)
(c) every fast backend available here through ``longkernels.lsh_attention`` against HF, float64;
(d) ``longkernels.nn.LSHSelfAttention`` against HF's ``LSHSelfAttention`` + ``ReformerSelfOutput``
    (module against module: projections, output dense, same rotations), float64, including lengths that
    are not a multiple of the chunk length (HF's input padded with ``attention_mask`` zeros, as HF's
    ``ReformerModel`` pads it).

HF draws its rotations as ``torch.manual_seed(config.hash_seed); torch.randn((H, D, n_hashes,
n_buckets // 2), dtype=qk.dtype)``; the tests draw them the same way and pass them to ours. Seeds are
fixed (parity needs equal hashes, asserted bucket for bucket); inputs differ from case to case.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="HuggingFace transformers is not installed: the Reformer parity "
                                           "tests compare against its LSHSelfAttention (pip install transformers)")
from transformers import ReformerConfig  # noqa: E402
from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSHSelfAttention  # noqa: E402
from transformers.models.reformer.modeling_reformer import ReformerSelfOutput  # noqa: E402

import longkernels  # noqa: E402
from longkernels.ops.lsh_attention import not_supported_reasons  # noqa: E402
from longkernels.reference.lsh_attention import lsh_attention as reference_lsh_attention  # noqa: E402
from longkernels.reference.lsh_attention import lsh_hash, padded_length  # noqa: E402
from longkernels.testing import FLOAT64_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HASH_SEED = 7


@dataclasses.dataclass(frozen=True)
class HFCase:
    B: int = 2
    H: int = 2
    L: int = 64
    D: int = 16
    chunk: int = 16
    n_hashes: int = 2
    n_buckets: int = 4
    causal: bool = False
    before: int = 1
    after: int = 0
    pad: bool = False  # batch 0 padded at the end, batch 1 (if any) at the start
    seed: int = 0

    @property
    def id(self) -> str:
        s = f"B{self.B}H{self.H}L{self.L}D{self.D}c{self.chunk}r{self.n_hashes}nb{self.n_buckets}"
        s += "-causal" if self.causal else "-full"
        s += f"-b{self.before}a{self.after}" + ("-pad" if self.pad else "")
        return s + ("-standard" if self.L <= self.chunk else "")

    def attention_mask(self) -> Optional[torch.Tensor]:
        """HF's convention: 1 = keep, 0 = padding (ours, ``key_padding_mask``, is its negation)."""
        if not self.pad:
            return None
        m = torch.ones(self.B, self.L, dtype=torch.long)
        m[0, self.L - max(1, self.L // 5):] = 0
        if self.B > 1:
            m[1, :5] = 0
        return m


CASES = [
    HFCase(n_hashes=1, seed=1),
    HFCase(n_hashes=2, causal=True, seed=2),
    HFCase(B=1, H=3, L=128, D=32, n_hashes=3, n_buckets=8, causal=True, seed=3),
    HFCase(L=96, causal=True, pad=True, seed=4),
    HFCase(L=96, before=2, after=1, pad=True, seed=5),
    HFCase(B=1, L=128, D=32, chunk=32, causal=True, before=1, after=1, seed=6),
    HFCase(L=64, before=0, after=0, n_buckets=8, seed=7),
    HFCase(L=32, chunk=64, causal=True, seed=8),  # L <= chunk: HF's standard-attention path
    HFCase(L=48, chunk=64, n_hashes=1, n_buckets=2, pad=True, seed=9),  # standard path with padding
]
# The float32 rule and the interpreted Triton backend on a few of them (the interpreter is slow).
LOWP_CASES = [CASES[0], CASES[1], CASES[2], CASES[3], CASES[4], CASES[5], CASES[7]]
TINY_CASES = [HFCase(B=1, L=64, causal=True, seed=11), HFCase(B=2, L=48, chunk=16, pad=True, seed=12),
              HFCase(B=1, L=32, chunk=64, causal=True, seed=13)]


def hf_config(case: HFCase, *, max_len: Optional[int] = None) -> ReformerConfig:
    return ReformerConfig(
        hidden_size=case.H * case.D, num_attention_heads=case.H, attention_head_size=case.D,
        lsh_attn_chunk_length=case.chunk, num_hashes=case.n_hashes, num_buckets=case.n_buckets,
        is_decoder=case.causal, lsh_num_chunks_before=case.before, lsh_num_chunks_after=case.after,
        hash_seed=HASH_SEED, lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
        max_position_embeddings=max_len or case.L, attn_layers=["lsh"])


def hf_rotations(case: HFCase, dtype: torch.dtype) -> torch.Tensor:
    """HF's draw, repeated: the rotations its layer hashes with."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HASH_SEED)
        return torch.randn(case.H, case.D, case.n_hashes, case.n_buckets // 2, dtype=dtype)


class _Given(nn.Module):
    """Stands in for HF's ``query_key`` / ``value`` projections: returns the given (B, L, H*D) tensor, so
    HF's attention core sees exactly our qk and v (and gradients flow back to them)."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.t = t

    def forward(self, hidden_states):
        return self.t


def hf_core(case: HFCase, qk: torch.Tensor, v: torch.Tensor, *, buckets: Optional[torch.Tensor] = None):
    """HF's LSHSelfAttention on given qk, v (B, H, L, D): returns out (B, H, L, D) and HF's buckets
    ((B, H, n_hashes, L), offset by round, or None on the standard-attention path)."""
    B, H, L, D = qk.shape
    layer = HFLSHSelfAttention(hf_config(case)).eval()
    layer.query_key = _Given(qk.transpose(1, 2).reshape(B, L, H * D))
    layer.value = _Given(v.transpose(1, 2).reshape(B, L, H * D))
    with torch.random.fork_rng(devices=[]):  # HF reseeds the global RNG with hash_seed
        res = layer(torch.zeros(B, L, H * D, dtype=qk.dtype), attention_mask=case.attention_mask(),
                    buckets=buckets)
    return res.hidden_states.view(B, L, H, D).transpose(1, 2), res.buckets


def our_buckets(case: HFCase, qk: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Our hash with HF's round offsets: bucket + r * n_buckets' (n_buckets + 1 when padding is present)."""
    m = case.attention_mask()
    pad = None if m is None else ~m.bool()
    nb = case.n_buckets + (1 if pad is not None and bool(pad.any()) else 0)
    return lsh_hash(qk, rotations, pad) + nb * torch.arange(case.n_hashes).view(1, 1, -1, 1)


def make_inputs(case: HFCase, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1000 + case.seed)
    shape = (case.B, case.H, case.L, case.D)
    qk = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    m = case.attention_mask()
    if m is not None:  # only real positions carry a loss; HF's outputs at padding are not compared
        dout = dout * m.to(dout.dtype)[:, None, :, None]
    return qk, v, dout


def forward_backward(fn, qk, v, dout):
    """out, d qk, d v of <fn(qk, v), dout> (leaves are fresh copies)."""
    a, b = qk.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    out = fn(a, b)
    dqk, dv = torch.autograd.grad((out * dout.to(out.dtype)).sum(), (a, b))
    return {"out": out.detach(), "dqk": dqk, "dv": dv}


def keep_mask(case: HFCase, like: torch.Tensor) -> torch.Tensor:
    m = case.attention_mask()
    if m is None:
        return torch.ones_like(like, dtype=torch.bool)
    return m.bool()[:, None, :, None].expand_as(like)


def errors(case: HFCase, got: dict, ref: dict) -> dict:
    """Relative errors; outputs only at real positions."""
    keep = keep_mask(case, ref["out"])
    res = {"out": rel_err(got["out"][keep], ref["out"][keep])}
    for name in ("dqk", "dv"):
        res[name] = rel_err(got[name], ref[name])
    return res


def ours(case: HFCase, rotations: torch.Tensor, backend: Optional[str] = None):
    m = case.attention_mask()
    kpm = None if m is None else ~m.bool()
    kw = dict(n_hashes=case.n_hashes, chunk_size=case.chunk, n_buckets=case.n_buckets, causal=case.causal,
              rotations=rotations, n_chunks_before=case.before, n_chunks_after=case.after, key_padding_mask=kpm)
    if backend is None:
        return lambda qk, v: reference_lsh_attention(qk, v, **kw)
    return lambda qk, v: longkernels.lsh_attention(qk, v, backend=backend, **kw)


def hf_fn(case: HFCase, buckets: Optional[torch.Tensor] = None):
    return lambda qk, v: hf_core(case, qk, v, buckets=buckets)[0]


# --------------------------------------------------------------------------------------------
# (a) reference vs HF, float64
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_matches_hf_float64(case):
    qk, v, dout = make_inputs(case, torch.float64)
    rotations = hf_rotations(case, torch.float64)
    _, hf_buckets = hf_core(case, qk, v)
    if case.L <= case.chunk:
        assert hf_buckets is None  # HF's standard (full) attention: the reference's one-chunk windows
    else:
        assert torch.equal(our_buckets(case, qk, rotations), hf_buckets)
    got = forward_backward(ours(case, rotations), qk, v, dout)
    ref = forward_backward(hf_fn(case), qk, v, dout)
    errs = errors(case, got, ref)
    assert max(errs.values()) < FLOAT64_RTOL, errs


# --------------------------------------------------------------------------------------------
# (b) float32 under the low-precision rule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: c.id)
def test_float32_matches_hf_lowp_rule(case, backend):
    if backend != "reference":
        reasons = not_supported_reasons(backend, torch.empty(1, 1, 1, case.D), torch.empty(1, 1, 1, case.D))
        if reasons:
            pytest.skip("; ".join(reasons))
    qk, v, dout = make_inputs(case, torch.float32)
    rotations = hf_rotations(case, torch.float32)
    _, hf_buckets = hf_core(case, qk, v)  # HF's float32 hash
    if hf_buckets is not None:
        assert torch.equal(our_buckets(case, qk, rotations), hf_buckets)
    # Truth: HF in float64 on the same (float32) inputs, hashing nothing: it is handed HF's float32
    # buckets, so every run below attends over the same windows.
    truth = forward_backward(hf_fn(case, buckets=hf_buckets), qk.double(), v.double(), dout)
    hf32 = forward_backward(hf_fn(case), qk, v, dout)
    got = forward_backward(ours(case, rotations, None if backend == "reference" else backend), qk, v, dout)
    hf_err, our_err = errors(case, hf32, truth), errors(case, got, truth)
    for name, err in our_err.items():
        allowed = LOWP_FACTOR * hf_err[name] + LOWP_FLOOR[torch.float32]
        assert err <= allowed, (name, err, allowed, our_err, hf_err)


# --------------------------------------------------------------------------------------------
# (c) the fast backends through the public function, float64
# --------------------------------------------------------------------------------------------
def _backend_skip(backend: str, case: HFCase) -> Optional[str]:
    if backend == "triton" and not (ROOT / "triton_kernels" / "lsh_attention.py").is_file():
        return "triton_kernels/lsh_attention.py does not exist yet: no Triton LSH kernels to test"
    probe = torch.empty(1, 1, 1, case.D, dtype=torch.float64)
    reasons = not_supported_reasons(backend, probe, probe)
    return "; ".join(reasons) if reasons else None


@pytest.mark.parametrize("backend,case", [("cpu", c) for c in CASES] + [("triton", c) for c in TINY_CASES],
                         ids=lambda x: x if isinstance(x, str) else x.id)
def test_backend_matches_hf_float64(backend, case):
    reason = _backend_skip(backend, case)
    if reason:
        pytest.skip(reason)
    qk, v, dout = make_inputs(case, torch.float64)
    rotations = hf_rotations(case, torch.float64)
    got = forward_backward(ours(case, rotations, backend), qk, v, dout)
    ref = forward_backward(hf_fn(case), qk, v, dout)
    errs = errors(case, got, ref)
    assert max(errs.values()) < FLOAT64_RTOL, errs


# --------------------------------------------------------------------------------------------
# (d) module against module
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModuleCase:
    base: HFCase
    user_pad: bool = False  # a key_padding_mask of the caller's (batch 0: end, batch 1: start)
    fix: str = "set_rotations"  # or "argument": how ours gets HF's rotations

    @property
    def id(self) -> str:
        return f"{self.base.id}{'-userpad' if self.user_pad else ''}-{self.fix}"


MODULE_CASES = [
    ModuleCase(HFCase(B=2, H=2, L=64, D=16, chunk=16, n_hashes=2, n_buckets=4, causal=True, seed=21)),
    ModuleCase(HFCase(B=2, H=4, L=70, D=8, chunk=16, n_hashes=2, n_buckets=4, causal=True, seed=22),
               fix="argument"),  # L not a multiple of the chunk length
    ModuleCase(HFCase(B=2, H=2, L=90, D=16, chunk=16, n_hashes=3, n_buckets=8, causal=False, after=1, seed=23),
               user_pad=True),
    ModuleCase(HFCase(B=1, H=2, L=40, D=16, chunk=64, n_hashes=2, n_buckets=4, causal=True, seed=24)),  # L <= chunk
]


@pytest.mark.parametrize("mcase", MODULE_CASES, ids=lambda c: c.id)
def test_module_matches_hf_module_float64(mcase):
    case = mcase.base
    B, L, E = case.B, case.L, case.H * case.D
    Lp = padded_length(L, case.chunk) if L > case.chunk else L
    g = torch.Generator().manual_seed(2000 + case.seed)
    cfg = hf_config(case, max_len=Lp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3000 + case.seed)
        hf_attn, hf_out = HFLSHSelfAttention(cfg).double().eval(), ReformerSelfOutput(cfg).double().eval()
    mine = longkernels.nn.LSHSelfAttention(E, case.H, chunk_size=case.chunk, n_hashes=case.n_hashes,
                                           n_buckets=case.n_buckets, causal=case.causal,
                                           n_chunks_before=case.before, n_chunks_after=case.after).double().eval()
    with torch.no_grad():
        mine.qk_proj.weight.copy_(hf_attn.query_key.weight)
        mine.v_proj.weight.copy_(hf_attn.value.weight)
        mine.out_proj.weight.copy_(hf_out.dense.weight)
    rotations = hf_rotations(case, torch.float64)
    if mcase.fix == "set_rotations":
        mine.set_rotations(rotations)

    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    dy = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    user = torch.zeros(B, L, dtype=torch.bool)
    if mcase.user_pad:
        user[0, L - 11:] = True
        if B > 1:
            user[1, :6] = True
        dy = dy.masked_fill(user[:, :, None], 0.0)  # outputs at padding are not compared

    # HF: pad the input to a multiple of the chunk length with attention_mask zeros (ReformerModel's way).
    x_hf = x.detach().clone().requires_grad_()
    hf_mask = torch.ones(B, Lp, dtype=torch.long)
    hf_mask[:, L:] = 0
    hf_mask[:, :L] = (~user).long()
    padded = torch.nn.functional.pad(x_hf, (0, 0, 0, Lp - L))
    with torch.random.fork_rng(devices=[]):
        res = hf_attn(padded, attention_mask=hf_mask if bool((hf_mask == 0).any()) else None)
    y_hf = hf_out(res.hidden_states)[:, :L]
    (y_hf * dy).sum().backward()

    x_me = x.detach().clone().requires_grad_()
    kpm = user if mcase.user_pad else None
    y_me = mine(x_me, key_padding_mask=kpm, rotations=rotations if mcase.fix == "argument" else None)
    (y_me * dy).sum().backward()

    keep = (~user)[:, :, None].expand_as(y_me)
    errs = {"out": rel_err(y_me.detach()[keep], y_hf.detach()[keep]), "dx": rel_err(x_me.grad, x_hf.grad),
            "d qk_proj": rel_err(mine.qk_proj.weight.grad, hf_attn.query_key.weight.grad),
            "d v_proj": rel_err(mine.v_proj.weight.grad, hf_attn.value.weight.grad),
            "d out_proj": rel_err(mine.out_proj.weight.grad, hf_out.dense.weight.grad)}
    assert max(errs.values()) < FLOAT64_RTOL, errs
    assert torch.equal(mine.last_rotations, rotations)
