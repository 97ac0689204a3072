"""ReformerBlock and LongContextLM: reversible against plain (float64, dropout on, LSH rotations replayed,
memory passed through), Transformer-XL segments against the whole sequence, saved bytes against depth,
weight tying, bad inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from longkernels import ReversibleBlock
from longkernels.nn import LongContextLM, LSHSelfAttention, MemoryAttention, MemoryCache, ReformerBlock
from longkernels.testing import FLOAT64_RTOL, rel_err, saved_tensor_bytes

VOCAB = 50


def make_lm(attention, *, depth=3, reversible=True, dropout=0.0, seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    defaults = {"memory": {"mem_len": 12}, "lsh": {"chunk_size": 8, "n_hashes": 2}}[attention]
    model = LongContextLM(VOCAB, 24, depth, 3, attention=attention, reversible=reversible, dropout=dropout,
                          ff_hidden=40, ff_chunks=3, **{**defaults, **kwargs})
    return model.to(dtype)


def tokens(B, L, seed):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def step(model, toks, mems=None, *, seed=11, **kwargs):
    """Forward under ``seed``, backward of a fixed random cotangent: logits, new mems, parameter grads."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(toks, mems, **kwargs)
    dy = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(3), dtype=out.logits.dtype)
    (out.logits * dy).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=FLOAT64_RTOL):
    assert a.keys() == b.keys()
    for name in a:
        err = rel_err(a[name], b[name])
        assert err <= rtol, f"gradient of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_memory_lm_reversible_matches_plain(dropout):
    """Two segments: the second attends over the memory of the first; both paths give the same logits,
    memories and gradients of every parameter, dropout included."""
    rev = make_lm("memory", dropout=dropout).train()
    plain = make_lm("memory", dropout=dropout, reversible=False).train()
    plain.load_state_dict(rev.state_dict())
    t1, t2 = tokens(2, 10, 0), tokens(2, 13, 1)
    results = []
    for model in (rev, plain):
        out1, g1 = step(model, t1, seed=5)
        out2, g2 = step(model, t2, out1.mems, seed=6)
        results.append((out1, g1, out2, g2))
    (a1, ga1, a2, ga2), (b1, gb1, b2, gb2) = results
    for x, y in ((a1, b1), (a2, b2)):
        assert rel_err(x.logits, y.logits) <= FLOAT64_RTOL
        assert len(x.mems) == 3
        for mx, my in zip(x.mems, y.mems):
            assert mx.pos == my.pos and not mx.k.requires_grad
            assert rel_err(mx.k, my.k) <= FLOAT64_RTOL and rel_err(mx.v, my.v) <= FLOAT64_RTOL
    assert a2.mems[0].pos == 23 and a2.mems[0].k.shape == (2, 3, 12, 8)
    assert_same(ga1, gb1)
    assert_same(ga2, gb2)
    assert len(ga2) == len(list(rev.parameters()))  # every parameter got a gradient (the head is tied)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lsh_lm_reversible_matches_plain(dropout):
    """Fresh rotations every forward: the reversible backward replays each block's hash and dropout."""
    rev = make_lm("lsh", dropout=dropout).train()
    plain = make_lm("lsh", dropout=dropout, reversible=False).train()
    plain.load_state_dict(rev.state_dict())
    toks = tokens(2, 29, 2)  # not a multiple of the chunk
    mask = torch.zeros(2, 29, dtype=torch.bool)
    mask[1, 25:] = True
    out_r, g_r = step(rev, toks, key_padding_mask=mask)
    out_p, g_p = step(plain, toks, key_padding_mask=mask)
    assert out_r.mems is None
    assert rel_err(out_r.logits, out_p.logits) <= FLOAT64_RTOL
    assert_same(g_r, g_p)


def test_memory_lm_segments_equal_whole_sequence():
    """Transformer-XL recurrence through the whole stack: with a window every layer's memory covers
    (mem_len >= window - 1), segment by segment equals the whole sequence at once."""
    window = 7
    for reversible in (True, False):
        model = make_lm("memory", window=window, mem_len=window - 1, reversible=reversible).eval()
        toks = tokens(2, 23, 4)
        with torch.no_grad():
            whole = model(toks).logits
            mems, parts = None, []
            for seg in toks.split(5, dim=1):
                out = model(seg, mems)
                parts.append(out.logits)
                mems = out.mems
        assert rel_err(torch.cat(parts, dim=1), whole) <= FLOAT64_RTOL


def test_memory_carries_information():
    model = make_lm("memory").eval()
    t1, t2 = tokens(1, 8, 5), tokens(1, 8, 6)
    with torch.no_grad():
        mems = model(t1).mems
        with_mem = model(t2, mems).logits
        without = model(t2).logits
    assert rel_err(with_mem, without) > 1e-3


def test_tied_and_untied_head():
    model = make_lm("memory")
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if n != "head.weight")
    untied = make_lm("memory", tie_weights=False)
    assert untied.head.weight is not untied.embed.weight


def saved_bytes(model, toks):
    return saved_tensor_bytes(model, toks, exclude=list(model.parameters()))


@pytest.mark.parametrize("attention", ["memory", "lsh"])
def test_saved_bytes_do_not_grow_with_depth(attention):
    toks = tokens(2, 32, 7)
    rev = {d: saved_bytes(make_lm(attention, depth=d, dtype=torch.float32, dropout=0.1).train(), toks) for d in (1, 6)}
    plain = {d: saved_bytes(make_lm(attention, depth=d, dtype=torch.float32, dropout=0.1, reversible=False).train(),
                            toks) for d in (1, 6)}
    assert rev[6] == rev[1], rev
    assert plain[6] >= 4 * plain[1], plain


def test_reformer_block_parts():
    block = ReformerBlock(16, 2, attention="lsh", chunk_size=4, ff_chunks=2)
    assert isinstance(block, ReversibleBlock)
    assert isinstance(block.attention, LSHSelfAttention) and block.attention.causal
    assert block.feed_forward.hidden == 64 and block.feed_forward.chunks == 2
    mem = ReformerBlock(16, 2, attention="memory", mem_len=5, window=4, num_kv_heads=1)
    assert isinstance(mem.attention, MemoryAttention) and mem.attention.num_kv_heads == 1
    x = torch.randn(2, 9, 16)
    (y1, y2), cache = mem(x, x)
    assert y1.shape == x.shape and isinstance(cache, MemoryCache) and cache.k.shape[2] == 5
    custom = ReformerBlock(16, 2, attention=nn.Linear(16, 16))
    assert custom.kind == "custom"
    y1, y2 = custom(x, x)
    x1, x2 = custom.inverse(y1, y2)
    assert rel_err(x1, x) < 1e-5 and rel_err(x2, x) < 1e-5


def test_bfloat16_model_with_float32_stream():
    model = make_lm("memory", dtype=torch.float32, stream_dtype=torch.float32).train()
    ref = make_lm("memory", dtype=torch.float32).train()
    ref.load_state_dict(model.state_dict())
    model.to(torch.bfloat16)
    toks = tokens(2, 16, 8)
    out, grads = step(model, toks)
    out_ref, grads_ref = step(ref, toks)
    assert out.logits.dtype == torch.bfloat16
    assert rel_err(out.logits.float(), out_ref.logits) < 0.05
    assert rel_err(grads["embed.weight"].float(), grads_ref["embed.weight"]) < 0.1


def test_bad_inputs():
    model = make_lm("memory")
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size=50"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="mems"):
        model(tokens(1, 4, 0), [None])
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(tokens(1, 4, 0), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    lsh = make_lm("lsh")
    with pytest.raises(ValueError, match="mems"):
        lsh(tokens(1, 4, 0), [None] * 3)
    with pytest.raises(ValueError, match="attention"):
        LongContextLM(VOCAB, 16, 2, 2, attention="dense")
    with pytest.raises(ValueError, match="attention"):
        ReformerBlock(16, 2, attention="dense")
    with pytest.raises(ValueError, match="dropout"):
        ReformerBlock(16, 2, dropout=1.5)
    with pytest.raises(TypeError, match="depth"):
        LongContextLM(VOCAB, 16, 2.0, 2)
    with pytest.raises(TypeError, match="tie_weights"):
        LongContextLM(VOCAB, 16, 2, 2, tie_weights=1)
