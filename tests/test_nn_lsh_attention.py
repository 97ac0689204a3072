"""longkernels.nn.LSHSelfAttention: the drop-in layer around lsh_attention."""
import pytest
import torch

import longkernels
from longkernels import _ext
from longkernels.nn import LSHSelfAttention
from longkernels.testing import rel_err

BACKEND = "cpu" if _ext.available() else "reference"


def _layer(**kw):
    args = dict(chunk_size=8, n_hashes=2, causal=True, backend=BACKEND)
    args.update(kw)
    return LSHSelfAttention(32, 4, **args).double()


def _x(B=2, L=37, seed=0):
    return torch.randn(B, L, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_layer_is_projections_around_lsh_attention():
    layer = _layer()
    x = _x()
    rot = torch.randn(4, 8, 2, 2)
    y = layer(x, rotations=rot)
    B, L, _ = x.shape
    qk = layer.qk_proj(x).view(B, L, 4, 8).transpose(1, 2)
    v = layer.v_proj(x).view(B, L, 4, 8).transpose(1, 2)
    o = longkernels.lsh_attention(qk, v, n_hashes=2, chunk_size=8, causal=True, rotations=rot, backend="reference")
    want = layer.out_proj(o.transpose(1, 2).reshape(B, L, 32))
    assert rel_err(y, want) < 1e-10


def test_backward_reaches_every_parameter():
    layer = _layer()
    x = _x().requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_draws_fresh_rotations_and_replays_them():
    layer = _layer().train()
    x = _x()
    y1 = layer(x)
    r1 = layer.last_rotations
    layer(x)
    assert not torch.equal(r1, layer.last_rotations)  # fresh each training forward
    assert torch.equal(layer(x, rotations=r1), y1)  # replayed explicitly
    layer._set_replay_state((r1, True))  # the recomputation protocol: one-shot
    assert torch.equal(layer(x), y1)
    layer(x)  # the order was one-shot: this call draws again
    assert not torch.equal(layer.last_rotations, r1)


def test_replay_consumes_the_rng_like_the_recorded_forward():
    """A recomputation under the restored RNG state replays the rotations and sees the same
    dropout mask after them: the replay draws as many random numbers as the forward did."""
    layer = _layer(dropout=0.5).train()
    x = _x()
    torch.manual_seed(5)
    y1 = layer(x)
    state = layer._get_replay_state()
    torch.manual_seed(5)
    layer._set_replay_state(state)
    assert torch.equal(layer(x), y1)


def test_seed_gives_reproducible_evaluation():
    layer = _layer(seed=1234).eval()
    x = _x()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(99)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    layer.train()
    with torch.no_grad():  # the training flag decides, as for dropout: fresh rotations here
        assert not torch.equal(layer(x), y1)
    layer.eval()
    assert torch.equal(layer(x), y1)


def test_fixed_rotations():
    layer = _layer().train()
    rot = torch.randn(4, 8, 2, 4)
    layer.set_rotations(rot)
    x = _x()
    assert torch.equal(layer(x), layer(x))
    assert torch.equal(layer.last_rotations, rot)
    layer.set_rotations(None)
    assert layer.fixed_rotations is None
    with pytest.raises(ValueError, match="rotations must be"):
        layer.set_rotations(torch.randn(4, 8, 3, 4))


def test_padding_never_reaches_real_positions():
    """Padded tokens go to their own bucket and are masked as keys: the real positions' outputs do
    not depend on what the padded positions hold."""
    layer = _layer(causal=False).eval()
    rot = torch.randn(4, 8, 2, 4)
    x = _x(B=2, L=30)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 20:] = True
    mask[1, :3] = True
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), 32, dtype=torch.float64) * 10
    y1 = layer(x, key_padding_mask=mask, rotations=rot)
    y2 = layer(x2, key_padding_mask=mask, rotations=rot)
    assert rel_err(y1[~mask], y2[~mask]) < 1e-12


def test_dropout_only_in_training():
    layer = _layer(dropout=0.5, seed=3)
    x = _x()
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    rot = torch.randn(4, 8, 2, 4)
    y = layer(x, rotations=rot)
    assert (y == 0).float().mean() > 0.3


def test_bfloat16_layer_runs():
    layer = LSHSelfAttention(32, 4, chunk_size=8, backend=BACKEND, dtype=torch.bfloat16)
    y = layer(torch.randn(1, 20, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(embed_dim=30, num_heads=4), ValueError, "divisible"),
    (dict(n_buckets=3), ValueError, "n_buckets must be even"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(causal="yes"), TypeError, "causal must be a bool"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(embed_dim=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LSHSelfAttention(**args)


def test_bad_forward_arguments():
    layer = _layer()
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 10, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1, 2])
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        layer(_x(L=10), key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
