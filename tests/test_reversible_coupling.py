"""The fused coupling of the reversible backward step (longkernels/ops/reversible_coupling.py) against the torch
expressions it replaces, ``y - fy.to(y.dtype)`` and ``dy + dgrad.to(dy.dtype)``: bitwise, for every
backend (C++ on CPU tensors; Triton on CUDA tensors, or on CPU tensors under the interpreter, which
tests/conftest.py switches on where there is no GPU)."""
import os

import pytest
import torch

from longkernels import _ext
from longkernels.ops.reversible_coupling import choose_backend, reversible_coupling

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _backends(device, stream):
    out = ["torch"]
    if device == "cpu" and _ext.available():
        out.append("cpu")
    if HAS_TRITON and not (device == "cuda" and stream == torch.float64):
        out.append("triton")
    return out


def _inputs(shape, stream, branch, grad_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    y, fy, dy, dg = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    return (y.to(device, stream), fy.to(device, branch), dy.to(device, stream), dg.to(device, grad_dtype or stream))


def _bitwise(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


CASES = [((1,), torch.float32), ((7,), torch.float32), ((3, 5, 7), torch.float32), ((2, 33, 65), torch.float32),
         ((1,), torch.float64), ((3, 5, 7), torch.float64), ((2, 33, 65), torch.float64)]


@pytest.mark.parametrize("branch", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape,stream", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here); the cpu case is its twin")])])
def test_bitwise(device, shape, stream, branch):
    y, fy, dy, dg = _inputs(shape, stream, branch, device=device)
    ref_x, ref_d = y - fy.to(stream), dy + dg.to(stream)
    for grad_dtype in (stream, branch):
        dg_ = dg.to(grad_dtype)
        ref_d = dy + dg_.to(stream)
        for backend in _backends(device, stream):
            x, d = reversible_coupling(y, fy, dy, dg_, backend=backend)
            assert _bitwise(x, ref_x) and _bitwise(d, ref_d), backend
            acc = dy.clone()
            x, d = reversible_coupling(y, fy, acc, dg_, inplace=True, backend=backend)
            assert d is acc and _bitwise(x, ref_x) and _bitwise(acc, ref_d), backend


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("branch", [torch.bfloat16, torch.float16])
def test_every_half_value(branch):
    """All 65536 bit patterns of the branch dtype (subnormals, infinities, NaNs) widen exactly."""
    fy = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(branch)
    for stream in (torch.float32, torch.float64):
        y = torch.randn(fy.shape, dtype=stream)
        y[:100] = 0
        ref_x, ref_d = y - fy.to(stream), y + fy.to(stream)
        for backend in _backends("cpu", stream):
            x, d = reversible_coupling(y, fy, y, fy, backend=backend)
            for got, ref in ((x, ref_x), (d, ref_d)):
                assert torch.equal(got.isnan(), ref.isnan()), backend
                keep = ~ref.isnan()
                assert torch.equal(got[keep], ref[keep]), backend


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (none here); the cpu case is its twin")])])
def test_non_contiguous(device):
    y, fy, dy, _ = (t.transpose(0, 2) for t in _inputs((6, 10, 9), torch.float32, torch.bfloat16, device=device))
    fy = fy.contiguous()[:, :, :]                   # one contiguous among strided ones
    dg = torch.randn(9, 10, 12, device=device)[..., ::2]  # a stepped last dimension
    assert not (y.is_contiguous() or dy.is_contiguous() or dg.is_contiguous())
    ref_x, ref_d = y - fy.to(torch.float32), dy + dg
    for backend in _backends(device, torch.float32):
        x, d = reversible_coupling(y, fy, dy, dg, backend=backend)
        assert _bitwise(x, ref_x) and _bitwise(d, ref_d), backend
        acc = dy.clone().transpose(0, 2).contiguous().transpose(0, 2)  # owned, non-contiguous
        assert not acc.is_contiguous()
        x, d = reversible_coupling(y, fy, acc, dg, inplace=True, backend=backend)
        assert d is acc and _bitwise(x, ref_x) and _bitwise(acc, ref_d), backend


def test_empty():
    y = torch.empty(0, 4)
    for backend in _backends("cpu", torch.float32):
        x, d = reversible_coupling(y, y.bfloat16(), y, y, backend=backend)
        assert x.shape == d.shape == (0, 4)


def test_bad_inputs():
    y, fy, dy, dg = _inputs((2, 3), torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="fy must have y's shape"):
        reversible_coupling(y, fy[:, :2], dy, dg)
    with pytest.raises(ValueError, match="dgrad must have y's shape"):
        reversible_coupling(y, fy, dy, dg.reshape(3, 2))
    with pytest.raises(TypeError, match="dgrad must be float16"):
        reversible_coupling(y, fy, dy, dg.to(torch.int32))
    with pytest.raises(TypeError, match="fy must be float16"):
        reversible_coupling(y, fy.to(torch.int64), dy, dg)
    with pytest.raises(TypeError, match="y must be float16"):
        reversible_coupling(y.to(torch.int32), fy, dy, dg)
    with pytest.raises(TypeError, match="dy must have the stream dtype"):
        reversible_coupling(y, fy, dy.double(), dg)
    with pytest.raises(TypeError, match="dy must be a torch.Tensor"):
        reversible_coupling(y, fy, dy.tolist(), dg)
    with pytest.raises(ValueError, match="dgrad must be on y's device"):
        reversible_coupling(y, fy, dy, dg.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        reversible_coupling(y, fy, dy, dg, backend="nope")
    if _ext.available():
        with pytest.raises(ValueError, match="float32 or float64 stream"):
            reversible_coupling(y.bfloat16(), fy, dy.bfloat16(), dg, backend="cpu")
        with pytest.raises(RuntimeError, match="dy must have y's shape"):  # the op's own check
            torch.ops.longkernels.reversible_coupling(y, fy, dy[:1], dg)


def test_default_backend():
    y = torch.zeros(3)
    assert choose_backend(y, None) == ("cpu" if _ext.available() else "torch")
    assert choose_backend(y.bfloat16(), None) == "torch"  # a bfloat16 stream: the torch expressions
    x, d = reversible_coupling(y.bfloat16(), y.bfloat16(), y.bfloat16(), y)
    assert x.dtype == d.dtype == torch.bfloat16


@pytest.mark.skipif(not _ext.available(), reason="needs the C++ extension")
def test_torch_compile_traces():
    """The fakes let torch.compile trace the ops (aot_eager: the traced graph, run eagerly)."""
    y, fy, dy, dg = _inputs((4, 8), torch.float32, torch.bfloat16)

    def step(y, fy, dy, dg):
        x, d = reversible_coupling(y, fy, dy, dg)
        x2 = reversible_coupling(y, fy, d, dg, inplace=True)[0]
        return x + x2, d

    x, d = torch.compile(step, backend="aot_eager", fullgraph=True)(y, fy, dy, dg)
    ref_x = y - fy.float()
    assert torch.equal(x, ref_x + ref_x) and torch.equal(d, dy + dg + dg)


# --------------------------------------------------------------------------------------------
# The reversible backward with the coupling wired in: bitwise the plain, out-of-place arithmetic.
# --------------------------------------------------------------------------------------------
class _Branch(torch.nn.Module):
    """x -> tanh(x W) + p, with p a parameter of the activations' full shape: its gradient is the
    incoming gradient itself (an identity path), which autograd may hand back without a copy."""

    def __init__(self, shape, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter((torch.randn(shape[-1], shape[-1], generator=g) / shape[-1] ** 0.5).to(dtype))
        self.p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype))

    def forward(self, x):
        return torch.tanh(x @ self.w) + self.p


def _plain_couple(y, fy, dy, dgrad, owned):
    if dgrad is None or dy is None:
        return y - fy.to(y.dtype), (dy if dgrad is None else dgrad), False
    return y - fy.to(y.dtype), dy + dgrad, False


@pytest.mark.parametrize("f_dtype,g_dtype,stream", [
    (torch.bfloat16, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float64),
    (torch.float16, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.float32)], ids=str)
def test_reversible_backward_bitwise(monkeypatch, f_dtype, g_dtype, stream):
    import longkernels
    from longkernels import reversible as rev

    shape, depth = (2, 5, 12), 4
    blocks = [longkernels.ReversibleBlock(_Branch(shape, f_dtype, 2 * i), _Branch(shape, g_dtype, 2 * i + 1))
              for i in range(depth)]
    seq = longkernels.ReversibleSequence(blocks, stream_dtype=stream)
    x = torch.randn(shape, dtype=torch.float32, generator=torch.Generator().manual_seed(9))

    def grads():
        for p in seq.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        seq(xi).pow(2).sum().backward()
        return [xi.grad] + [p.grad for p in seq.parameters()]

    calls = []
    fused = rev._ops_coupling()

    class Spy:
        @staticmethod
        def reversible_coupling(*args, **kwargs):
            calls.append(kwargs.get("inplace"))
            return fused.reversible_coupling(*args, **kwargs)

    if fused is not None:
        monkeypatch.setattr(rev, "_ops_coupling", lambda: Spy)
    got = grads()
    monkeypatch.setattr(rev, "_couple", _plain_couple)
    ref = grads()
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if fused is not None:
        n_cast = (f_dtype != stream) + (g_dtype != stream)
        assert len(calls) == n_cast * depth
        if f_dtype != stream and g_dtype != stream:  # all but the first block's two couplings in place
            assert calls.count(True) == 2 * (depth - 1)
