"""Compressive memory (Rae et al. 2019; docs/semantics.md §9): evicted keys/values compressed into a second
cache attended before the memory, the attention-reconstruction loss, and the model around them."""
from __future__ import annotations

import pytest
import torch

import longkernels
from longkernels.nn import LongContextLM, MemoryAttention
from longkernels.testing import FLOAT64_RTOL, rel_err


def _layer(compression, seed, **kw):
    torch.manual_seed(seed)
    return MemoryAttention(32, 4, num_kv_heads=2, mem_len=kw.pop("mem_len", 10), cmem_len=kw.pop("cmem_len", 6),
                           compression_rate=kw.pop("rate", 3), compression=compression, dtype=torch.float64, **kw)


@pytest.mark.parametrize("compression", ["mean", "conv"])
@pytest.mark.parametrize("positions", ["rotary", "relative"])
def test_caches_and_outputs(seed, compression, positions):
    """Every segment's output is attention over cat(compressed, memory, segment) as the caches say; the
    memory keeps the last tokens (whole groups of the rate evicted), the compressed cache the compression
    of every evicted group, at most cmem_len of them."""
    layer = _layer(compression, seed, positions=positions)
    x = torch.randn(2, 7 * 8, 32, dtype=torch.float64)
    mems, history_k, compressed = None, [], []
    for s in range(7):
        xs = x[:, s * 8:(s + 1) * 8]
        y, new = layer(xs, mems)
        # The same call, by hand: the layer's projections, the memory operand cat(ck, mem).
        B, L, _ = xs.shape
        q = layer.q_proj(xs).view(B, L, 4, 8)
        k = layer.k_proj(xs).view(B, L, 2, 8)
        v = layer.v_proj(xs).view(B, L, 2, 8)
        pos = 0 if mems is None else mems.pos
        if positions == "rotary":
            q, k = layer.rotary(q, pos, seq_dim=1), layer.rotary(k, pos, seq_dim=1)
        mk = mv = None
        if mems is not None:
            mk, mv = torch.cat([mems.ck, mems.k], 2), torch.cat([mems.cv, mems.v], 2)
        rel = {}
        if positions == "relative":
            from longkernels.nn.relative import relative_pos_emb
            n = (0 if mk is None else mk.shape[2]) + L
            rel = dict(pos_emb=relative_pos_emb(layer.r_net, n, 4, 8), content_bias=layer.content_bias,
                       pos_bias=layer.pos_bias)
        o = longkernels.reference.memory_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mk, mv,
                                                   **rel)
        want = layer.out_proj(o.transpose(1, 2).reshape(B, L, 32))
        assert rel_err(y, want) <= FLOAT64_RTOL, f"segment {s}"
        # Bookkeeping against the whole history of keys.
        history_k.append(k.detach().transpose(1, 2))
        allk = torch.cat(history_k, 2)
        n_evicted = allk.shape[2] - new.k.shape[2]
        assert n_evicted % 3 == 0 and 10 <= new.k.shape[2] < 10 + 3 or allk.shape[2] <= 10
        assert torch.equal(new.k, allk[:, :, n_evicted:])
        if new.evicted_k.shape[2]:
            compressed.append(layer.compress(new.evicted_k, new.evicted_v)[0].detach())
        want_ck = torch.cat(compressed, 2)[:, :, -6:] if compressed else new.ck
        assert new.ck.shape[2] <= 6 and rel_err(new.ck, want_ck) <= FLOAT64_RTOL
        mems = new
    assert mems.ck.shape[2] == 6  # full


def test_mean_compression_is_mean_pooling():
    layer = _layer("mean", 0, rate=4)
    k = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    ck, cv = layer.compress(k, 2 * k)
    assert torch.equal(ck, k.view(1, 2, 2, 4, 8).mean(3)) and torch.equal(cv, 2 * ck)


def test_reconstruction_loss_trains_the_compression_only():
    layer = _layer("conv", 1, mem_len=8, rate=2)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    opt = torch.optim.Adam(list(layer.compress_k.parameters()) + list(layer.compress_v.parameters()), lr=3e-2)
    losses = []
    for step in range(30):
        mems = None
        total = 0.0
        for s in range(5):
            _, mems = layer(x[:, s * 8:(s + 1) * 8], mems)
            loss = layer.reconstruction_loss(mems)
            if loss is not None:
                total = total + loss
        if step == 0:
            grads = torch.autograd.grad(total, [layer.q_proj.weight, layer.compress_k.weight], allow_unused=True,
                                        retain_graph=True)
            assert grads[0] is None and grads[1].abs().sum() > 0  # stopped into the attention, not the compression
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert _layer("mean", 0).reconstruction_loss(None) is None


def test_reversible_model_carries_both_caches(seed):
    def run(reversible):
        torch.manual_seed(seed)
        model = LongContextLM(64, 32, 2, 4, attention="memory", mem_len=8, cmem_len=4, compression_rate=2,
                              compression="conv", reversible=reversible, dtype=torch.float64)
        tokens = torch.randint(0, 64, (2, 5 * 6), generator=torch.Generator().manual_seed(seed))
        mems, logits, aux = None, [], 0.0
        for s in range(5):
            out = model(tokens[:, s * 6:(s + 1) * 6], mems)
            mems = out.mems
            logits.append(out.logits)
            rl = model.reconstruction_loss(mems)
            aux = aux + (rl if rl is not None else 0.0)
        (torch.cat(logits, 1).sum() + aux).backward()
        return torch.cat(logits, 1), mems, {n: p.grad for n, p in model.named_parameters()}
    a, ma, ga = run(True)
    b, mb, gb = run(False)
    assert rel_err(a, b) <= 1e-9
    for x, y in zip(ma, mb):
        assert rel_err(x.ck, y.ck) <= 1e-9 and rel_err(x.k, y.k) <= 1e-9
    for name in ga:
        assert rel_err(ga[name], gb[name]) <= 1e-8, name
    assert ga["layers.blocks.0.f.fn.compress_k.weight"].abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(cmem_len=4), "needs compression_rate"),
    (dict(cmem_len=4, compression_rate=0), "compression_rate must be >= 1"),
    (dict(cmem_len=4, compression_rate=2, compression="max"), "compression must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryAttention(32, 4, mem_len=8, **kwargs)
