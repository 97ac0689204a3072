"""merge_attention (docs/semantics.md §7): attention over disjoint key sets merged by the LSE equals attention
over their union, with gradients to every part's output and LSE."""
from __future__ import annotations

import pytest
import torch

import longkernels
from longkernels.reference.memory_attention import memory_attention as reference
from longkernels.testing import FLOAT64_RTOL, rel_err


def _parts(seed, n_parts, B=2, H=3, N=17, L=40, D=8, dtype=torch.float64, hide_rows=False):
    """q over L keys split into n_parts disjoint random sets (key_padding_mask hides the others)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype)
    owner = torch.randint(0, n_parts, (B, L), generator=g)
    if hide_rows:  # part 0 holds no key at all: LSE -inf on every row
        owner = owner.clamp(min=1) if n_parts > 1 else owner
    # The queries as the last N positions of a (M = L - N) memory-attention call, non-causal.
    mem = dict(mem_k=k[:, :, : L - N], mem_v=v[:, :, : L - N])
    return q, k, v, owner, mem


def _attend(q, k, v, kpm, L, N):
    return reference(q, k[:, :, L - N:], v[:, :, L - N:], k[:, :, : L - N], v[:, :, : L - N], causal=False,
                     key_padding_mask=kpm, return_lse=True)


@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
@pytest.mark.parametrize("hide_rows", [False, True])
def test_merge_equals_union(seed, n_parts, hide_rows):
    B, N, L = 2, 17, 40
    q, k, v, owner, _ = _parts(seed, n_parts, hide_rows=hide_rows)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    outs, lses = zip(*[_attend(q, k, v, owner != p, L, N) for p in range(n_parts)])
    out, lse = longkernels.merge_attention(list(outs), list(lses))
    want, want_lse = _attend(q, k, v, None, L, N)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_err(out, want) <= FLOAT64_RTOL and rel_err(lse, want_lse) <= FLOAT64_RTOL
    g = torch.Generator().manual_seed(seed + 1)
    dout, dlse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                         dtype=torch.float64)
    got = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v), retain_graph=True)
    ref = torch.autograd.grad((want * dout).sum() + (want_lse * dlse).sum(), (q, k, v))
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= FLOAT64_RTOL


def test_gradcheck_every_part():
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lses = [torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with torch.no_grad():
        lses[1][0, 1] = float("-inf")  # a part that saw nothing on one row

    def f(*xs):
        return longkernels.merge_attention(list(xs[:3]), list(xs[3:]))

    assert torch.autograd.gradcheck(f, (*outs, *lses))


def test_all_parts_empty():
    outs = [torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(2)]
    lses = [torch.full((1, 2, 3), float("-inf"), requires_grad=True) for _ in range(2)]
    out, lse = longkernels.merge_attention(outs, lses)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    for t in (*outs, *lses):
        assert torch.isfinite(t.grad).all() and not t.grad.any()


def test_nan_part_propagates():
    outs = [torch.zeros(1, 1, 2, 3), torch.ones(1, 1, 2, 3)]
    lses = [torch.tensor([[[0.0, float("nan")]]]), torch.zeros(1, 1, 2)]
    out, lse = longkernels.merge_attention(outs, lses)
    assert torch.isfinite(out[..., 0, :]).all() and torch.isnan(out[..., 1, :]).all() and torch.isnan(lse[..., 1])


def test_low_precision_parts_merge_in_float32():
    outs = [torch.randn(2, 4, 8).bfloat16() for _ in range(3)]
    lses = [torch.randn(2, 4) * 30 for _ in range(3)]
    out, lse = longkernels.merge_attention(outs, lses)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out32, _ = longkernels.merge_attention(outs, lses, out_dtype=torch.float32)
    w = torch.softmax(torch.stack(lses), 0)
    want = (w.unsqueeze(-1) * torch.stack([o.float() for o in outs])).sum(0)
    assert rel_err(out32, want) <= 1e-6
    assert torch.equal(lse, torch.logsumexp(torch.stack(lses), 0))


@pytest.mark.parametrize("outs, lses, err, match", [
    (torch.zeros(2, 3, 4), [torch.zeros(2, 3)], TypeError, "outs must be a list"),
    ([], [], ValueError, "at least one part"),
    ([torch.zeros(2, 3, 4)], [torch.zeros(2, 3), torch.zeros(2, 3)], ValueError, "same number of parts"),
    ([torch.zeros(2, 3, 4)], [torch.zeros(2, 4)], ValueError, r"outs\[0\] must have shape"),
    ([torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)], [torch.zeros(2, 3)] * 2, ValueError, "head dim"),
    ([torch.zeros(2, 3, 4, dtype=torch.long)], [torch.zeros(2, 3)], TypeError, "floating point"),
])
def test_bad_input(outs, lses, err, match):
    with pytest.raises(err, match=match):
        longkernels.merge_attention(outs, lses)
