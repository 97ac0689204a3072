"""longkernels.nn.MemoryAttention: segment recurrence, parity with plain PyTorch, validation.

Everything runs in float64 on the CPU, once with the reference backend and once with the default
dispatch (the C++ kernel when longkernels._C is built, else the reference).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from longkernels.nn import MemoryAttention, MemoryCache, RotaryEmbedding

DT = torch.float64
BACKENDS = ["reference", None]
E, H = 16, 4  # head dim 4


def _layer(seed, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dtype", DT)
    return MemoryAttention(E, H, **kw)


def _run_segments(layer, x, lengths):
    ys, mems = [], None
    for seg in x.split(lengths, dim=1):
        y, mems = layer(seg, mems)
        ys.append(y)
    return torch.cat(ys, dim=1), mems


def _max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------------
# The segment recurrence equals the whole sequence at once
# --------------------------------------------------------------------------------------------
# Query at absolute position p sees keys (p - window, p]. In a segment starting at s it has the
# current segment up to p and the last min(mem_len, s) earlier tokens, i.e. keys [s - mem_len, p]
# (clipped at 0). Every visible key is there iff p - window + 1 >= s - mem_len for all p >= s, i.e.
# mem_len >= window - 1, whatever the segment lengths. Rotary positions are absolute (the cache
# carries the next position), so the keys in memory were rotated exactly as in the full pass.
@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("S,mem_len,window,lengths", [
    (5, 5, 6, [5, 5, 5, 5]),       # window = mem_len + 1 = S + 1: the boundary case
    (5, 5, 3, [5, 5, 5, 5]),       # window smaller than the memory
    (5, 5, 2, [5, 3, 1, 6, 5]),    # uneven segments, including a single-token one
    (4, 0, 1, [4, 4, 4]),          # no memory: only a window of 1 (self only) is exact
    (4, 16, None, [4, 4, 4, 4]),   # no window: the memory holds every earlier token
], ids=["w=S+1", "w<mem", "uneven", "nomem", "nowindow"])
def test_segments_match_whole_sequence(backend, rotary, num_kv_heads, S, mem_len, window, lengths):
    layer = _layer(0, mem_len=mem_len, window=window, num_kv_heads=num_kv_heads, rotary=rotary, backend=backend)
    torch.manual_seed(1)
    T = sum(lengths)
    x = torch.randn(2, T, E, dtype=DT)
    y_full, full_cache = layer(x)
    y_seg, seg_cache = _run_segments(layer, x, lengths)
    assert y_seg.shape == y_full.shape == (2, T, E)
    assert _max_err(y_seg, y_full) < 1e-10, _max_err(y_seg, y_full)
    # The two caches describe the same last mem_len tokens at the same position.
    assert seg_cache.pos == full_cache.pos == T
    assert seg_cache.k.shape == (2, num_kv_heads, min(mem_len, T), E // H)
    assert _max_err(seg_cache.k, full_cache.k) < 1e-12 and _max_err(seg_cache.v, full_cache.v) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_memory_shorter_than_window_differs(backend):
    # The converse: with mem_len < window - 1 a query loses keys it would see in the full pass.
    layer = _layer(0, mem_len=2, window=6, backend=backend)
    torch.manual_seed(1)
    x = torch.randn(1, 10, E, dtype=DT)
    y_full, _ = layer(x)
    y_seg, _ = _run_segments(layer, x, [5, 5])
    assert _max_err(y_seg[:, :5], y_full[:, :5]) < 1e-10  # first segment has no memory to miss
    assert _max_err(y_seg[:, 5:], y_full[:, 5:]) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_default_backend_matches_reference(backend):
    torch.manual_seed(0)
    ref = MemoryAttention(E, H, mem_len=4, window=5, num_kv_heads=2, dtype=DT, backend="reference")
    other = MemoryAttention(E, H, mem_len=4, window=5, num_kv_heads=2, dtype=DT, backend=backend)
    other.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, E, dtype=DT)
    assert _max_err(_run_segments(ref, x, [4] * 3)[0], _run_segments(other, x, [4] * 3)[0]) < 1e-10


# --------------------------------------------------------------------------------------------
# Gradients: to every parameter, never into memory
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_gradients_reach_parameters_not_memory(backend):
    layer = _layer(0, mem_len=4, window=5, num_kv_heads=2, backend=backend)
    torch.manual_seed(1)
    x1 = torch.randn(2, 4, E, dtype=DT, requires_grad=True)
    x2 = torch.randn(2, 4, E, dtype=DT, requires_grad=True)
    y1, mems = layer(x1)
    assert not mems.k.requires_grad and not mems.v.requires_grad
    assert mems.k.grad_fn is None and mems.v.grad_fn is None
    y2, mems2 = layer(x2, mems)
    assert not mems2.k.requires_grad and not mems2.v.requires_grad
    # Segment 2's output depends on segment 1 only through the (detached) memory.
    g_x1, g_x2 = torch.autograd.grad(y2.square().sum(), [x1, x2], allow_unused=True,
                                     retain_graph=True)
    assert g_x1 is None
    assert g_x2 is not None and g_x2.abs().sum() > 0
    (y1.square().sum() + y2.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
def test_gradients_match_plain_pytorch(backend):
    layer = _layer(0, mem_len=0, window=3, num_kv_heads=2, backend=backend)
    torch.manual_seed(1)
    x = torch.randn(2, 6, E, dtype=DT)
    layer(x)[0].square().sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    _explicit(layer, x, window=3).square().sum().backward()
    for n, p in layer.named_parameters():
        assert _max_err(got[n], p.grad) < 1e-10, n


# --------------------------------------------------------------------------------------------
# Parity with an explicit plain-PyTorch layer
# --------------------------------------------------------------------------------------------
def _rope(x, offset, base=10000.0):
    """(B, L, h, D) rotated at positions offset.., rotate-half: pairs (i, i + D/2) by pos * base^(-2i/D)."""
    L, D = x.shape[1], x.shape[-1]
    pos = torch.arange(offset, offset + L, dtype=DT)
    theta = pos[:, None] * base ** (-2.0 * torch.arange(D // 2, dtype=DT) / D)  # (L, D/2)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _explicit(layer, x, *, window=None, offset=0, rotary=True, mem=None):
    B, L, _ = x.shape
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, L, Hq, D)
    k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, L, Hkv, D)
    v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, L, Hkv, D)
    if rotary:
        q, k = _rope(q, offset), _rope(k, offset)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mem is not None:
        k, v = torch.cat([mem.k, k], dim=2), torch.cat([mem.v, v], dim=2)
    M = k.shape[2] - L
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    qpos = torch.arange(L)[:, None] + M
    kpos = torch.arange(M + L)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.linear(o.transpose(1, 2).reshape(B, L, Hq * D), layer.out_proj.weight, layer.out_proj.bias)


@pytest.mark.parametrize("backend", BACKENDS, ids=["reference", "default"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("num_kv_heads,window", [(4, None), (2, 3), (1, 1)])
def test_matches_plain_pytorch_one_segment(backend, rotary, num_kv_heads, window):
    layer = _layer(0, mem_len=3, window=window, num_kv_heads=num_kv_heads, rotary=rotary, backend=backend)
    with torch.no_grad():  # non-zero biases, so the bias path is checked too
        for p in (layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias, layer.out_proj.bias):
            p.normal_()
    torch.manual_seed(1)
    x = torch.randn(2, 7, E, dtype=DT)
    y, mems = layer(x)
    assert _max_err(y, _explicit(layer, x, window=window, rotary=rotary)) < 1e-10
    # And the second segment, against explicit attention over the cached (already rotated) memory.
    x2 = torch.randn(2, 5, E, dtype=DT)
    y2, _ = layer(x2, mems)
    ref2 = _explicit(layer, x2, window=window, rotary=rotary, offset=7, mem=mems)
    assert _max_err(y2, ref2) < 1e-10


# --------------------------------------------------------------------------------------------
# Cache structure, dropout, misc
# --------------------------------------------------------------------------------------------
def test_cache_structure():
    layer = _layer(0, mem_len=6, num_kv_heads=2)
    torch.manual_seed(1)
    x = torch.randn(3, 4, E, dtype=DT)
    _, c = layer(x)
    assert isinstance(c, MemoryCache) and c.pos == 4 and c.k.shape == c.v.shape == (3, 2, 4, 4)
    _, c = layer(x, c)
    assert c.pos == 8 and c.k.shape == (3, 2, 6, 4) and c.k.is_contiguous()
    _, c = layer(x[:, :1], tuple(c))  # a plain tuple is accepted
    assert c.pos == 9 and c.k.shape == (3, 2, 6, 4)
    nomem = _layer(0, mem_len=0)
    _, c = nomem(x)
    assert c.k.shape == (3, 4, 0, 4) and c.pos == 4  # no memory, but positions continue
    _, c = nomem(x, c)
    assert c.pos == 8


def test_dropout_only_in_training():
    layer = _layer(0, mem_len=2, dropout=0.5)
    torch.manual_seed(1)
    x = torch.randn(2, 5, E, dtype=DT)
    layer.eval()
    y_eval = layer(x)[0]
    assert torch.equal(y_eval, layer(x)[0])
    layer.train()
    y_train = layer(x)[0]
    zeros = y_train == 0
    assert zeros.any()
    assert torch.allclose(y_train[~zeros], 2 * y_eval[~zeros], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,exc,name", [
    ((10, 3), {"mem_len": 4}, ValueError, "embed_dim"),
    ((0, 1), {"mem_len": 4}, ValueError, "embed_dim"),
    ((16, 0), {"mem_len": 4}, ValueError, "num_heads"),
    ((16, 2.0), {"mem_len": 4}, TypeError, "num_heads"),
    ((16, 4), {"mem_len": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
    ((16, 4), {"mem_len": -1}, ValueError, "mem_len"),
    ((16, 4), {"mem_len": 4, "window": 0}, ValueError, "window"),
    ((16, 4), {"mem_len": 4, "dropout": 1.5}, ValueError, "dropout"),
    ((12, 4), {"mem_len": 4}, ValueError, "rotary"),  # head dim 3 is odd
])
def test_constructor_validation(args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        MemoryAttention(*args, **kwargs)
    MemoryAttention(12, 4, mem_len=4, rotary=False)  # odd head dim is fine without rotary


def test_forward_validation():
    layer = _layer(0, mem_len=4, num_kv_heads=2)
    x = torch.randn(2, 3, E, dtype=DT)
    with pytest.raises(TypeError, match="x"):
        layer(x.numpy())
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, E"):
        layer(x[0])
    with pytest.raises(ValueError, match="embed_dim"):
        layer(torch.randn(2, 3, E + 1, dtype=DT))
    _, mems = layer(x)
    with pytest.raises(ValueError, match="mems.k"):
        layer(x[:1], mems)  # batch size changed
    with pytest.raises(TypeError, match="mems"):
        layer(x, mems.k)
    with pytest.raises(ValueError, match="mems.pos"):
        layer(x, mems._replace(pos=1))


# --------------------------------------------------------------------------------------------
# RotaryEmbedding
# --------------------------------------------------------------------------------------------
def test_rotary_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(2, 1, 8, dtype=DT).unbind(0)  # (L=1, D) each

    def score(m, n):
        return (rope(q, m) * rope(k, n)).sum().item()

    for m, n in [(0, 0), (5, 2), (2, 5), (7, 7), (30, 1)]:
        for shift in (1, 13, 1000):
            assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=0, abs_tol=1e-12)
    assert not math.isclose(score(5, 2), score(2, 5), abs_tol=1e-6)  # depends on m - n, signed


def test_rotary_properties():
    torch.manual_seed(0)
    rope = RotaryEmbedding(6)
    x = torch.randn(2, 5, 3, 6, dtype=DT)  # (B, L, H, D)
    y = rope(x, 4, seq_dim=1)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)  # a rotation
    assert torch.equal(rope(x[:, :1], 0, seq_dim=1), x[:, :1])  # position 0 is the identity
    # Rotating a slice at its offset equals slicing the rotated whole (the cache is sliced right).
    assert torch.equal(rope(x, 0, seq_dim=1)[:, 2:], rope(x[:, 2:], 2, seq_dim=1))
    assert torch.allclose(rope(x.transpose(1, 2), 4), y.transpose(1, 2), rtol=0, atol=0)
    # Past the cached range the tables are computed per call and agree with the cached ones.
    small = RotaryEmbedding(6, max_cached_positions=3)
    assert torch.allclose(small(x, 4, seq_dim=1), y, rtol=0, atol=1e-15)
    # Lower precision: computed in float32, returned in the input dtype.
    assert rope(x.float(), 4, seq_dim=1).dtype == torch.float32
    h = rope(x.to(torch.bfloat16), 4, seq_dim=1)
    assert h.dtype == torch.bfloat16 and torch.allclose(h.double(), y, atol=5e-2)
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(5)
