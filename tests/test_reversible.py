"""Reversible layers (docs/semantics.md §3) and the chunked feed-forward.

The reversible sequence is held to the same blocks run as a plain sequence with ordinary autograd
(``reversible=False``): outputs and the gradients of the input and of every parameter, with dropout on
(RNG replay), LSH attention inside F (rotation replay), extra arguments and side outputs. Then:
reconstruction drift against depth, bytes saved for backward against depth, DistributedDataParallel,
and input validation.
"""
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from longkernels.nn import LSHSelfAttention, PreNorm
from longkernels.nn.feedforward import ChunkedFeedForward, chunk_bounds
from longkernels.reversible import ReversibleBlock, ReversibleSequence
from longkernels.testing import FLOAT64_RTOL, rel_err, saved_tensor_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ddp_worker  # noqa: E402

# float32 gradient parity. The two paths compute every F and G on inputs that differ only by the
# reconstruction round-off (a few float32 ulps of the stream per block, measured ~1e-7 relative after 4
# blocks, test_reconstruction_drift), and the Jacobians of these pre-norm blocks are O(1), so the
# gradients differ by the same order; 1e-5 is ~30x the measured gap (3e-7 to 4e-7) and still five
# orders below any real bug (a wrong mask or a missing dropout replay is an O(1) error).
FLOAT32_GRAD_RTOL = 1e-5


# --------------------------------------------------------------------------------------------
# Blocks used by the tests
# --------------------------------------------------------------------------------------------
def mlp(dim, hidden, dropout=0.0):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


def mlp_stack(depth, dim=16, hidden=32, dropout=0.0, **kwargs):
    return ReversibleSequence([ReversibleBlock(PreNorm(dim, mlp(dim, hidden, dropout)),
                                               PreNorm(dim, mlp(dim, hidden, dropout)))
                               for _ in range(depth)], **kwargs)


class MaskedMix(nn.Module):
    """Token mixing that takes a key-padding mask (True = padding) and an optional extra tensor."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.mem = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask=None, memory=None, scale=1.0):
        keep = (~mask).unsqueeze(-1).to(x.dtype) if mask is not None else torch.ones_like(x[..., :1])
        pooled = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
        out = self.proj(torch.tanh(x + pooled)) * scale
        if memory is not None:
            out = out + self.mem(memory.mean(1, keepdim=True))
        return out


class WithSide(nn.Module):
    """Returns (out, new_memory) as a memory-attention block would."""

    def __init__(self, dim, mem_len=3):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.mem_len = mem_len

    def forward(self, x):
        out = torch.tanh(self.lin(x))
        return out, {"memory": x[:, -self.mem_len:].clone(), "length": x.shape[1]}


class OwnGenerator(nn.Module):
    """Noise from its own counter-seeded generator, not torch's RNG: only the replay protocol can make
    a recomputation see the noise of the forward."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls = 0
        self.last = None
        self._replay = None

    def reset_calls(self):
        self.calls = 0

    def _get_replay_state(self):
        return self.last

    def _set_replay_state(self, state):
        self._replay = state

    def forward(self, x):
        if self._replay is not None:
            seed, self._replay = self._replay, None
        else:
            self.calls += 1
            seed = 1000 + self.calls
        self.last = seed
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        return self.lin(x) * (1 + 0.5 * noise)


# --------------------------------------------------------------------------------------------
# Running both paths
# --------------------------------------------------------------------------------------------
def run(seq, x, reversible, *, seed=123, extra=(), **kwargs):
    """Forward under ``seed``, backward of a fixed random cotangent; the output, side outputs and the
    gradients of x, of the tensors in ``extra`` and of every parameter (by name)."""
    seq.reversible = reversible
    seq.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    for t in extra:
        t.grad = None
    for m in seq.modules():
        if isinstance(m, OwnGenerator):
            m.reset_calls()
    torch.manual_seed(seed)
    out = seq(x, **kwargs)
    out, sides = out if isinstance(out, tuple) else (out, None)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    (out * dy).sum().backward()
    grads = {"x": x.grad}
    grads.update({f"extra{i}": t.grad for i, t in enumerate(extra)})
    grads.update({n: p.grad for n, p in seq.named_parameters()})
    return out.detach(), sides, grads


def assert_parity(seq, x, *, rtol, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*random numbers", category=RuntimeWarning)
        out_r, sides_r, g_r = run(seq, x, True, **kwargs)  # a replay that consumes the RNG unlike the forward fails
    out_p, sides_p, g_p = run(seq, x, False, **kwargs)
    assert rel_err(out_r, out_p) <= rtol, "forward outputs differ"
    assert g_r.keys() == g_p.keys()
    worst = 0.0
    for name in g_p:
        assert (g_r[name] is None) == (g_p[name] is None), name
        if g_p[name] is not None:
            err = rel_err(g_r[name], g_p[name])
            worst = max(worst, err)
            assert err <= rtol, f"gradient of {name}: relative error {err:.2e} > {rtol:.0e}"
    return worst, sides_r, sides_p


# --------------------------------------------------------------------------------------------
# Gradient parity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_GRAD_RTOL)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_parity_mlp_blocks(dtype, rtol, dropout):
    torch.manual_seed(0)
    seq = mlp_stack(4, dropout=dropout).to(dtype).train()
    x = torch.randn(2, 9, 16, dtype=dtype)
    worst, _, _ = assert_parity(seq, x, rtol=rtol)
    print(f"\n{dtype} dropout={dropout}: worst gradient relative error {worst:.2e}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_parity_cuda_dropout():
    """On CUDA the dropout masks come from the device generator: its state is recorded and replayed."""
    torch.manual_seed(0)
    seq = mlp_stack(4, dropout=0.25).double().cuda()
    x = torch.randn(2, 9, 16, dtype=torch.float64, device="cuda")
    assert_parity(seq, x, rtol=FLOAT64_RTOL)


def test_dropout_replay_matters():
    """Negative control: with the recorded RNG states dropped, recomputation draws other masks."""
    import longkernels.reversible as rev

    torch.manual_seed(0)
    seq = mlp_stack(2, dropout=0.25).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _, _, g_p = run(seq, x, False)
    original = rev.RngState.restored
    try:
        rev.RngState.restored = lambda self: torch.random.fork_rng(devices=[])
        with pytest.warns(RuntimeWarning, match="different amount of random numbers"):
            _, _, g_r = run(seq, x, True)
    finally:
        rev.RngState.restored = original
    assert max(rel_err(g_r[n], g_p[n]) for n in g_p) > 1e-3


class GreedyInBackward(nn.Module):
    """Draws one extra random number when grad is enabled (i.e. only in the recomputation), before its
    dropout: the mask of the recomputation is not the forward's."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        if torch.is_grad_enabled():
            torch.rand(1)
        return nn.functional.dropout(self.lin(x), p=0.3, training=self.training)


def test_rng_consumption_mismatch_warns():
    torch.manual_seed(0)
    seq = ReversibleSequence([ReversibleBlock(nn.Linear(8, 8), GreedyInBackward(8))]).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="G of block 0 drew a different amount of random numbers"):
        seq(x).sum().backward()


def test_two_streams_and_duplicated_input():
    torch.manual_seed(0)
    seq = mlp_stack(3).double()
    x1, x2 = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    y1, y2 = seq(x1, x2)
    ref1, ref2 = x1, x2
    for block in seq.blocks:
        ref1 = ref1 + block.f(ref2)
        ref2 = ref2 + block.g(ref1)
    assert rel_err(y1, ref1) <= FLOAT64_RTOL and rel_err(y2, ref2) <= FLOAT64_RTOL
    y1, y2 = seq(x1, x1)
    assert torch.equal(seq(x1), (y1 + y2) / 2)  # x enters as (x, x), leaves as the mean
    a, b = seq.inverse(y1, y2)
    assert rel_err(a, x1) <= FLOAT64_RTOL and rel_err(b, x1) <= FLOAT64_RTOL


def test_parity_two_streams():
    torch.manual_seed(0)
    seq = mlp_stack(3, dropout=0.1).double()
    x1, x2 = (torch.randn(2, 7, 16, dtype=torch.float64).requires_grad_() for _ in range(2))
    grads = []
    for reversible in (True, False):
        seq.reversible = reversible
        seq.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        y1, y2 = seq(x1, x2)
        grads.append(torch.autograd.grad((y1 * 1.5 + y2.sin()).sum(), [x1, x2, *seq.parameters()]))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= FLOAT64_RTOL


def test_autograd_grad_sees_parameters():
    """Parameters are inputs of the Function: torch.autograd.grad reaches them (no hidden accumulation)."""
    torch.manual_seed(0)
    seq = mlp_stack(2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    params = list(seq.parameters())
    gs = torch.autograd.grad(seq(x).sum(), params)
    assert all(p.grad is None for p in params)
    seq.reversible = False
    ref = torch.autograd.grad(seq(x).sum(), params)
    assert max(rel_err(a, b) for a, b in zip(gs, ref)) <= FLOAT64_RTOL


def test_frozen_parameters_and_input_without_grad():
    torch.manual_seed(0)
    seq = mlp_stack(2).double()
    for p in seq.blocks[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    _, _, g_r = run(seq, x, True)
    _, _, g_p = run(seq, x, False)
    for name in g_p:
        assert (g_r[name] is None) == (g_p[name] is None)
        if g_p[name] is not None:
            assert rel_err(g_r[name], g_p[name]) <= FLOAT64_RTOL
    seq.zero_grad(set_to_none=True)
    seq(x).sum().backward()  # x needs no grad: only parameters
    assert seq.blocks[1].f.fn[0].weight.grad is not None


def test_no_grad_runs_plain_and_saves_nothing():
    torch.manual_seed(0)
    seq = mlp_stack(2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
    seq.reversible = False
    with torch.no_grad():
        assert torch.equal(y, seq(x))
    assert not y.requires_grad


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_GRAD_RTOL)])
def test_parity_lsh_attention(dtype, rtol):
    """LSHSelfAttention in F draws fresh rotations every forward; the backward must replay them, and the
    chunked feed-forward's dropout in G, exactly. A key-padding mask goes to F through f_kwargs."""
    torch.manual_seed(0)
    dim = 32
    seq = ReversibleSequence([
        ReversibleBlock(PreNorm(dim, LSHSelfAttention(dim, 2, chunk_size=8, n_hashes=2, backend="cpu")),
                        PreNorm(dim, ChunkedFeedForward(dim, 64, chunks=3, dropout=0.2)))
        for _ in range(3)]).to(dtype)
    x = torch.randn(2, 32, dim, dtype=dtype)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[1, 27:] = True
    worst, _, _ = assert_parity(seq, x, rtol=rtol, f_kwargs={"key_padding_mask": mask})
    print(f"\nLSH {dtype}: worst gradient relative error {worst:.2e}")
    # The rotations were fresh per block and per call (a fixed hash would make replay trivial).
    rots = [b.f.fn.last_rotations for b in seq.blocks]
    assert not torch.equal(rots[0], rots[1])


def test_parity_lsh_attention_with_attention_dropout():
    """Dropout inside LSHSelfAttention, after its rotation draw: the replayed rotations must leave the
    RNG where the recorded forward left it, or the recomputed dropout mask is another one."""
    torch.manual_seed(0)
    dim = 32
    seq = ReversibleSequence([
        ReversibleBlock(PreNorm(dim, LSHSelfAttention(dim, 2, chunk_size=8, n_hashes=2, dropout=0.2, backend="cpu")),
                        PreNorm(dim, mlp(dim, 64)))
        for _ in range(2)]).double()
    assert_parity(seq, torch.randn(2, 32, dim, dtype=torch.float64), rtol=FLOAT64_RTOL)


def test_replay_protocol():
    """A module whose randomness is not torch's RNG: the replay state makes the recomputation exact, and
    without it (negative control) the gradients are wrong."""
    torch.manual_seed(0)
    dim = 16
    seq = ReversibleSequence([ReversibleBlock(PreNorm(dim, OwnGenerator(dim)), OwnGenerator(dim))
                              for _ in range(3)]).double()
    x = torch.randn(2, 6, dim, dtype=torch.float64)
    assert_parity(seq, x, rtol=FLOAT64_RTOL)
    _, _, g_p = run(seq, x, False)
    for m in seq.modules():
        if isinstance(m, OwnGenerator):
            m._get_replay_state = lambda: None  # noqa: B023 (the protocol turned off)
    _, _, g_r = run(seq, x, True)
    assert max(rel_err(g_r[n], g_p[n]) for n in g_p) > 1e-3


def test_extra_arguments():
    """Masks (no grad) and a memory tensor that requires grad, shared or per block, and non-tensor args."""
    torch.manual_seed(0)
    dim, depth = 16, 3
    seq = ReversibleSequence([ReversibleBlock(MaskedMix(dim), MaskedMix(dim)) for _ in range(depth)]).double()
    x = torch.randn(2, 8, dim, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 6:] = True
    memory = torch.randn(2, 4, dim, dtype=torch.float64, requires_grad=True)
    mems = [torch.randn(2, 4, dim, dtype=torch.float64, requires_grad=True) for _ in range(depth)]
    # One dict for every block: the memory's gradient sums over the blocks (and over F and G).
    assert_parity(seq, x, rtol=FLOAT64_RTOL, extra=[memory],
                  f_kwargs={"mask": mask, "memory": memory, "scale": 0.5}, g_kwargs={"mask": mask, "memory": memory})
    _, _, g = run(seq, x, True, extra=[memory], f_kwargs={"mask": mask, "memory": memory})
    assert g["extra0"] is not None and g["extra0"].abs().sum() > 0
    # One dict per block (per-layer memories), None for a block without extra arguments.
    assert_parity(seq, x, rtol=FLOAT64_RTOL, extra=mems,
                  f_kwargs=[{"mask": mask, "memory": m} for m in mems], g_kwargs=[None, {"mask": mask}, None])
    # The mask does matter (so it really reached the blocks).
    out_masked, _, _ = run(seq, x, True, f_kwargs={"mask": mask})
    out_plain, _, _ = run(seq, x, True)
    assert rel_err(out_masked, out_plain) > 1e-3


def test_side_outputs():
    torch.manual_seed(0)
    dim = 16
    seq = ReversibleSequence([ReversibleBlock(WithSide(dim), PreNorm(dim, mlp(dim, 32, 0.1))),
                              ReversibleBlock(PreNorm(dim, mlp(dim, 32)), PreNorm(dim, mlp(dim, 32))),
                              ReversibleBlock(WithSide(dim), PreNorm(dim, mlp(dim, 32)))]).double()
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    _, sides_r, sides_p = assert_parity(seq, x, rtol=FLOAT64_RTOL)
    assert len(sides_r) == 3 and sides_r[1] is None and sides_p[1] is None
    for sr, sp in zip(sides_r[::2], sides_p[::2]):
        assert sr["length"] == 7 and sr["memory"].shape == (2, 3, dim)
        assert not sr["memory"].requires_grad and not sp["memory"].requires_grad
        assert torch.equal(sr["memory"], sp["memory"])
    # The first block's memory is the input itself (F of block 0 sees x2 = x).
    assert torch.equal(sides_r[0]["memory"], x[:, -3:])
    (y1, y2), sides = seq(x, x)  # two streams: ((y1, y2), sides)
    assert y1.shape == x.shape and len(sides) == 3


def test_odd_feature_dim():
    """The streams are duplicated, never split: any last dimension works."""
    torch.manual_seed(0)
    seq = mlp_stack(2, dim=7, hidden=9).double()
    assert_parity(seq, torch.randn(3, 5, 7, dtype=torch.float64), rtol=FLOAT64_RTOL)


def test_stream_dtype_parity():
    """bfloat16 blocks in a float32 stream: both paths round the same way, so the gradients agree to
    the reconstruction's effect, and the output is returned in the input's dtype."""
    torch.manual_seed(0)
    seq = mlp_stack(3, dropout=0.1, stream_dtype=torch.float32).to(torch.bfloat16)
    x = torch.randn(2, 8, 16)
    out_r, _, g_r = run(seq, x, True)
    out_p, _, g_p = run(seq, x, False)
    assert out_r.dtype == torch.float32 and torch.equal(out_r, out_p)
    worst = max(rel_err(g_r[n], g_p[n]) for n in g_p)
    print(f"\nbf16 blocks, float32 stream: worst gradient relative error {worst:.2e}")
    # float32 stream reconstruction is exact to float32 round-off, which almost never flips a bf16
    # rounding of an F/G input here: the bf16 gradients themselves are then bitwise-equal or off by
    # a bf16 ulp (2^-8) in a few entries.
    assert worst <= 1e-2
    assert seq(x.bfloat16()).dtype == torch.bfloat16


def test_bf16_lsh_blocks_float64_stream_exact():
    """bfloat16 LSH blocks in a float64 stream: reconstruction is exact (see test_reconstruction_drift),
    so the recomputation sees bit for bit the forward's inputs, hashes into the same buckets, and the
    gradients equal the plain sequence's exactly. (In a float32 stream a rare flipped bf16 rounding can
    move a position to another bucket: measured ~4e-3 here after 8 blocks.)"""
    torch.manual_seed(0)
    dim = 32
    seq = ReversibleSequence([
        ReversibleBlock(PreNorm(dim, LSHSelfAttention(dim, 2, chunk_size=8, n_hashes=2, backend="cpu")),
                        PreNorm(dim, ChunkedFeedForward(dim, 64, chunks=3, dropout=0.2)))
        for _ in range(8)], stream_dtype=torch.float64).to(torch.bfloat16)
    x = torch.randn(2, 64, dim)
    out_r, _, g_r = run(seq, x, True)
    out_p, _, g_p = run(seq, x, False)
    assert out_r.dtype == torch.float32 and torch.equal(out_r, out_p)
    for name in g_p:
        assert torch.equal(g_r[name], g_p[name]), name


# --------------------------------------------------------------------------------------------
# Fixed-point streams: exact reconstruction at any depth
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FLOAT64_RTOL), (torch.float32, FLOAT32_GRAD_RTOL)])
def test_fixed_point_parity(dtype, rtol):
    """Both paths round the streams to the same grid (straight-through gradients): same outputs and
    gradients, dropout on."""
    torch.manual_seed(0)
    seq = mlp_stack(4, dropout=0.25, fixed_point=True).to(dtype).train()
    assert_parity(seq, torch.randn(2, 9, 16, dtype=dtype), rtol=rtol)


def test_fixed_point_gradient_is_straight_through():
    """The grid rounding changes values by at most 2**-17 and passes gradients unchanged, so the
    gradients are those of the unrounded stack up to that perturbation."""
    torch.manual_seed(0)
    seq = mlp_stack(3, dropout=0.0).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    _, _, g_exact = run(seq, x, True)
    seq.fixed_point = 16
    _, _, g_fixed = run(seq, x, True)
    errs = {name: rel_err(g_fixed[name], g_exact[name]) for name in g_exact}
    assert max(errs.values()) <= 1e-3, errs
    assert errs["x"] > 0  # the rounding did happen


@pytest.mark.parametrize("kind", ["mlp", "lsh"])
def test_fixed_point_bf16_blocks_float32_stream_exact(kind):
    """bfloat16 blocks in a float32 fixed-point stream: every residual add is exact, so inverse(forward(x))
    returns the entering (rounded) streams bit for bit after 48 blocks (ordinary float32 streams drift,
    test_reconstruction_drift), and the reversible gradients equal the plain ones exactly, LSH included."""
    torch.manual_seed(0)
    dim = 32
    if kind == "mlp":
        seq = mlp_stack(48, dim=dim, hidden=64, stream_dtype=torch.float32, fixed_point=True)
    else:
        seq = ReversibleSequence([
            ReversibleBlock(PreNorm(dim, LSHSelfAttention(dim, 2, chunk_size=8, n_hashes=2, seed=i, backend="cpu")),
                            PreNorm(dim, ChunkedFeedForward(dim, 64, chunks=3)))
            for i in range(48)], stream_dtype=torch.float32, fixed_point=True)
    seq = seq.to(torch.bfloat16).eval()
    x = torch.randn(2, 40, dim) * 3
    with torch.no_grad():
        y1, y2 = seq(x, x)
        a, b = seq.inverse(y1, y2)
    snapped = torch.round(x * 2.0 ** 16) / 2.0 ** 16
    assert torch.equal(a, snapped) and torch.equal(b, snapped)
    assert rel_err(a, x) < 1e-5
    if kind == "lsh":
        seq.train()  # fresh rotations and dropout-free training forward, replayed in the backward
        seq.blocks = seq.blocks[:6]
        out_r, _, g_r = run(seq, x, True)
        out_p, _, g_p = run(seq, x, False)
        assert torch.equal(out_r, out_p)
        for name in g_p:  # x's gradient sums float32 terms in another order: round-off apart
            assert torch.equal(g_r[name], g_p[name]) if name != "x" else rel_err(g_r[name], g_p[name]) < 1e-7, name


def test_fixed_point_arguments():
    lin = nn.Linear(4, 4)
    blocks = [ReversibleBlock(lin, lin)]
    assert ReversibleSequence(blocks, fixed_point=True).fixed_point == 16
    assert ReversibleSequence(blocks, fixed_point=20).fixed_point == 20
    assert ReversibleSequence(blocks).fixed_point is None
    with pytest.raises(ValueError, match="fixed_point"):
        ReversibleSequence(blocks, fixed_point=0)
    with pytest.raises(TypeError, match="fixed_point"):
        ReversibleSequence(blocks, fixed_point="yes")
    with pytest.raises(ValueError, match="fixed_point needs a float32 or float64 stream"):
        ReversibleSequence(blocks, stream_dtype=torch.bfloat16, fixed_point=True)
    seq = ReversibleSequence([ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4))], fixed_point=True).half()
    with pytest.raises(ValueError, match="stream_dtype=torch.float32"):
        seq(torch.randn(2, 4).half())


# --------------------------------------------------------------------------------------------
# Reconstruction drift against depth
# --------------------------------------------------------------------------------------------
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9}  # unit round-off


def test_reconstruction_drift():
    """x -> (y1, y2) -> inverse, in eval mode (deterministic blocks), depths 1..48.

    Bounds. Each block rounds four times in the stream dtype (two residual adds forward, two
    subtractions back), each at most one unit round-off u of the stream's magnitude; the pre-norm
    blocks' inverse map amplifies an error by O(1) per block. float32: the worst case adds up linearly,
    4 u per block, x2 margin -> 8 u depth (~2.3e-5 at 48; measured ~7e-7). bfloat16 stream: the
    roundings are independent, a random walk: sqrt(4 depth) u, x4 margin for amplification (~0.11 at 48;
    measured ~3e-2). bf16 blocks in a float32 stream: F and G see the float32 stream rounded to bf16,
    and reconstruction reproduces those roundings except where a float32 round-off flips one (a
    probability of ~2^-16 per element and function; each flip is a bf16 ulp in one F/G input): the
    issue's target, 1e-3 after 48 blocks, and at least 10x better than the bf16 stream. (The flips
    grow with the number of elements: ~2e-3 at 48 blocks of 2x256x256, `longkernels bench --ops reversible`.)
    bf16 blocks in a float64 stream: a float32 input plus sums of bf16 outputs (8 significant bits)
    fit float64's 53 bits unless magnitudes differ by ~2^29, so the stream is reconstructed exactly and
    no rounding flips: float64 round-off at most (1e-12).
    """
    torch.manual_seed(0)
    dim, depth = 32, 48
    blocks = [ReversibleBlock(PreNorm(dim, mlp(dim, 64)), PreNorm(dim, mlp(dim, 64))) for _ in range(depth)]
    x = torch.randn(2, 64, dim)
    configs = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
               "bfloat16 in float32 stream": (torch.bfloat16, torch.float32),
               "bfloat16 in float64 stream": (torch.bfloat16, torch.float64)}
    depths = [1, 2, 4, 8, 16, 32, 48]
    errors = {}
    for name, (module_dtype, stream_dtype) in configs.items():
        errors[name] = []
        for d in depths:
            seq = ReversibleSequence([b for b in blocks[:d]], stream_dtype=stream_dtype)
            seq.to(module_dtype).eval()
            xin = x.to(stream_dtype or module_dtype)
            with torch.no_grad():
                y1, y2 = seq(xin, xin)
                a, b = seq.inverse(y1, y2)
            errors[name].append(rel_err(torch.cat([a, b]), torch.cat([xin, xin])))
        for blk in blocks:
            blk.float()
    print("\nreconstruction relative error (depth: " + ", ".join(map(str, depths)) + ")")
    for name, errs in errors.items():
        print(f"  {name:28s} " + "  ".join(f"{e:.1e}" for e in errs))
    for d, e in zip(depths, errors["float32"]):
        assert e <= 8 * EPS[torch.float32] * d, (d, e)
    for d, e in zip(depths, errors["bfloat16"]):
        assert e <= 4 * EPS[torch.bfloat16] * (4 * d) ** 0.5, (d, e)
    for e in errors["bfloat16 in float32 stream"]:
        assert e <= 1e-3
    assert errors["bfloat16 in float32 stream"][-1] * 10 <= errors["bfloat16"][-1]
    for e in errors["bfloat16 in float64 stream"]:
        assert e <= 1e-12


# --------------------------------------------------------------------------------------------
# Bytes saved for backward against depth
# --------------------------------------------------------------------------------------------
def saved_activation_bytes(module, x, fn=None, include_input=False) -> int:
    """Distinct storages saved for backward during one forward of ``fn`` (default ``module``), the
    module's parameters (and unless ``include_input``, the input) excluded."""
    exclude = list(module.parameters()) + ([] if include_input else [x])
    return saved_tensor_bytes(fn or module, x, exclude=exclude)


@pytest.mark.parametrize("kind", ["mlp", "lsh"])
def test_saved_bytes_do_not_grow_with_depth(kind):
    dim = 32
    x = torch.randn(2, 32, dim, requires_grad=True)

    def stack(depth, reversible):
        torch.manual_seed(0)
        if kind == "mlp":
            return mlp_stack(depth, dim=dim, hidden=64, dropout=0.1, reversible=reversible)
        return ReversibleSequence([
            ReversibleBlock(PreNorm(dim, LSHSelfAttention(dim, 2, chunk_size=8, n_hashes=2, backend="cpu")),
                            PreNorm(dim, ChunkedFeedForward(dim, 64, chunks=4, dropout=0.1)))
            for _ in range(depth)], reversible=reversible)

    rev = {d: saved_activation_bytes(stack(d, True), x) for d in (2, 8)}
    plain = {d: saved_activation_bytes(stack(d, False), x) for d in (2, 8)}
    print(f"\n{kind}: saved bytes reversible {rev}, plain {plain}")
    assert rev[2] > 0 and abs(rev[8] - rev[2]) <= 0.1 * rev[2]
    assert plain[8] >= 3 * plain[2]
    assert rev[8] * 4 <= plain[8]


# --------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel():
    """Two CPU processes (gloo), half the batch each: the averaged gradients equal one process's on the
    whole batch (the loss is a mean, and both halves have the same size). With find_unused_parameters
    False and True (the parameters are inputs of the Function, so DDP's graph walk finds them)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker.worker, args=(world, _free_port(), out_dir), nprocs=world, join=True)
        results = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
    model = _ddp_worker.build_model()
    x, target = _ddp_worker.batch()
    x.requires_grad_()
    _ddp_worker.loss_fn(model(x), target).backward()
    per = x.shape[0] // world
    for find_unused in (False, True):
        for r in range(world):
            got = results[r][find_unused]
            for name, p in model.named_parameters():
                assert rel_err(got["params"][name], p.grad) <= FLOAT64_RTOL, (find_unused, name, r)
            # Each rank's input gradient is that of its half under its own mean: world x the full batch's.
            assert rel_err(got["x"], world * x.grad[r * per:(r + 1) * per]) <= FLOAT64_RTOL


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def test_bad_inputs():
    lin = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        ReversibleBlock(lambda x: x, lin)
    with pytest.raises(TypeError, match="g must be an nn.Module"):
        ReversibleBlock(lin, torch.zeros(3))
    with pytest.raises(TypeError, match=r"blocks\[1\] must be a ReversibleBlock.*wrap"):
        ReversibleSequence([ReversibleBlock(lin, lin), nn.Linear(4, 4)])
    with pytest.raises(TypeError, match=r"blocks\[0\] must be a ReversibleBlock"):
        ReversibleSequence(["not a module"])
    with pytest.raises(TypeError, match="iterable of ReversibleBlock"):
        ReversibleSequence(ReversibleBlock(lin, lin))
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequence([])
    with pytest.raises(TypeError, match="stream_dtype must be a torch.dtype"):
        ReversibleSequence([ReversibleBlock(lin, lin)], stream_dtype="float32")
    with pytest.raises(ValueError, match="floating-point dtype"):
        ReversibleSequence([ReversibleBlock(lin, lin)], stream_dtype=torch.int32)
    with pytest.raises(TypeError, match="reversible must be a bool"):
        ReversibleSequence([ReversibleBlock(lin, lin)], reversible=1)

    seq = ReversibleSequence([ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2)])
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        seq([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        seq(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x2 must match x"):
        seq(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="one dict per block"):
        seq(x, f_kwargs=[{}])
    with pytest.raises(TypeError, match="f_kwargs must be a dict"):
        seq(x, f_kwargs="mask")
    with pytest.raises(TypeError, match=r"g_kwargs\[0\] must be a dict"):
        seq(x, g_kwargs=[1, {}])
    bad = ReversibleSequence([ReversibleBlock(nn.Linear(4, 5), nn.Linear(4, 4))])
    for reversible in (True, False):
        bad.reversible = reversible
        with pytest.raises(ValueError, match="F of block 0 must preserve its input's shape"):
            bad(x)
    g_side = ReversibleSequence([ReversibleBlock(nn.Linear(4, 4), WithSide(4))])
    with pytest.raises(TypeError, match="only F may return a side output"):
        g_side(x)


# --------------------------------------------------------------------------------------------
# ChunkedFeedForward
# --------------------------------------------------------------------------------------------
def unchunked(ff: ChunkedFeedForward, x):
    from torch.nn import functional as F
    return ff.fc2(F.dropout(ff._act(ff.fc1(x)), p=ff.dropout, training=ff.training))


@pytest.mark.parametrize("L,chunks", [(12, 4), (10, 3), (5, 8), (7, 1)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, FLOAT64_RTOL), (torch.float32, 1e-6)])
def test_chunked_feed_forward_matches_unchunked(L, chunks, dtype, rtol):
    # float32: the same dot products row by row; only BLAS blocking over a different row count may
    # reorder a sum (a few ulps).
    torch.manual_seed(0)
    ff = ChunkedFeedForward(8, 24, chunks).to(dtype)
    x = torch.randn(3, L, 8, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, L, 8, dtype=dtype)
    out = ff(x)
    got = torch.autograd.grad((out * dy).sum(), [x, *ff.parameters()])
    ref_out = unchunked(ff, x)
    ref = torch.autograd.grad((ref_out * dy).sum(), [x, *ff.parameters()])
    assert rel_err(out, ref_out) <= rtol
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= rtol


def test_chunk_bounds():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(6, 1) == [(0, 6)]


def test_chunked_feed_forward_dropout_and_gradcheck():
    """With dropout the backward replays each chunk's mask: equal to the same chunk loop under plain
    autograd, and gradcheck passes under a fixed seed."""
    torch.manual_seed(0)
    ff = ChunkedFeedForward(6, 16, 3, dropout=0.3, activation="silu").double()
    x = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 10, 6, dtype=torch.float64)
    torch.manual_seed(3)
    got = torch.autograd.grad((ff(x) * dy).sum(), [x, *ff.parameters()])
    torch.manual_seed(3)
    ref_out = torch.cat([unchunked(ff, x[:, s:e]) for s, e in chunk_bounds(10, 3)], dim=1)
    ref = torch.autograd.grad((ref_out * dy).sum(), [x, *ff.parameters()])
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= FLOAT64_RTOL

    def fn(inp):
        torch.manual_seed(11)
        return ff(inp)
    assert torch.autograd.gradcheck(fn, (x,))


def test_chunked_feed_forward_saved_bytes_do_not_scale_with_hidden():
    x = torch.randn(2, 64, 16, requires_grad=True)
    saved = {}
    for hidden in (32, 512):
        torch.manual_seed(0)
        ff = ChunkedFeedForward(16, hidden, chunks=8, dropout=0.1)
        saved[("chunked", hidden)] = saved_activation_bytes(ff, x, include_input=True)
        saved[("unchunked", hidden)] = saved_activation_bytes(ff, x, fn=lambda t, ff=ff: unchunked(ff, t),
                                                              include_input=True)
    print(f"\nsaved bytes (parameters excluded): {saved}")
    # The chunked module saves its input and nothing else: no hidden-sized tensor at all.
    assert saved[("chunked", 32)] == saved[("chunked", 512)] == x.nbytes
    assert saved[("unchunked", 512)] - x.nbytes >= 8 * (saved[("unchunked", 32)] - x.nbytes) > 0


def test_chunked_feed_forward_bad_inputs():
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        ChunkedFeedForward(4, 8, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ChunkedFeedForward(4, 8, 2, activation="swishy")
    with pytest.raises(ValueError, match="dropout"):
        ChunkedFeedForward(4, 8, 2, dropout=1.5)
    ff = ChunkedFeedForward(4, 8, 2)
    with pytest.raises(ValueError, match=r"x must be \(B, L, dim=4\)"):
        ff(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"x must be \(B, L, dim=4\)"):
        ff(torch.randn(3, 4))
    assert ChunkedFeedForward(4, 8, 2, activation=torch.sin)(torch.randn(1, 3, 4)).shape == (1, 3, 4)
