"""Chunked feed-forward (Reformer): the hidden activation never exists for the whole sequence."""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..reversible import RngState, rng_devices
from .memory_attention import _check_int

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``min(chunks, length)`` contiguous pieces whose sizes differ by at most one (``tensor_split``)."""
    n = max(1, min(chunks, length))
    base, extra = divmod(length, n)
    bounds, start = [], 0
    for i in range(n):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _feed_forward(x, w1, b1, w2, b2, act, p: float, training: bool):
    return F.linear(F.dropout(act(F.linear(x, w1, b1)), p=p, training=training), w2, b2)


class _ChunkedFeedForwardFunction(torch.autograd.Function):
    """Saves only the input (and the RNG state when dropout is active); the backward recomputes each
    chunk's hidden activation in the forward's order, so every chunk sees the dropout mask it had."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act, p, training, chunks):
        bounds = chunk_bounds(x.shape[1], chunks)
        random = training and p > 0
        ctx.rng = RngState(rng_devices([x])) if random else None
        out = torch.cat([_feed_forward(x[:, s:e], w1, b1, w2, b2, act, p, training) for s, e in bounds], dim=1)
        ctx.act, ctx.p, ctx.training, ctx.bounds = act, p, training, bounds
        ctx.save_for_backward(x, w1, b1, w2, b2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad[:5]
        leaves = [t.detach().requires_grad_(n) if t is not None else None
                  for t, n in zip((w1, b1, w2, b2), need[1:])]
        grads = [None] * 4
        dx = torch.empty_like(x) if need[0] else None
        with ctx.rng.restored() if ctx.rng is not None else contextlib.nullcontext():
            for s, e in ctx.bounds:
                xc = x[:, s:e].detach().requires_grad_(need[0])
                wrt = [t for t in [xc, *leaves] if t is not None and t.requires_grad]
                with torch.enable_grad():
                    oc = _feed_forward(xc, *leaves, ctx.act, ctx.p, ctx.training)
                got = iter(torch.autograd.grad(oc, wrt, dout[:, s:e], allow_unused=True)) if wrt else iter(())
                del oc
                if need[0]:
                    dx[:, s:e] = next(got)
                for k, t in enumerate(leaves):
                    if t is not None and t.requires_grad:
                        g = next(got)
                        if g is not None:
                            grads[k] = g if grads[k] is None else grads[k] + g
        return (dx, *grads, None, None, None, None)


class ChunkedFeedForward(nn.Module):
    """``Linear(dim, hidden) -> activation -> dropout -> Linear(hidden, dim)`` over ``(B, L, dim)``, applied
    to ``chunks`` pieces of the sequence (dim 1) in turn (Reformer's chunked feed-forward).

    The ``(B, L, hidden)`` activation never exists: the forward computes one chunk at a time, and so does
    the backward, which recomputes each chunk's hidden activation from the input (the only tensor saved
    for backward; dropout masks are replayed from the recorded RNG state). ``chunks`` need not divide
    ``L``: the pieces differ in length by at most one (``torch.tensor_split``); ``chunks > L`` means one
    position per piece. Without dropout the result equals the unchunked feed-forward up to round-off
    (the same products, row by row); with dropout the masks are drawn per chunk.

    Args:
        dim: model width (input and output features).
        hidden: hidden width.
        chunks: number of sequence chunks (1: unchunked, but still recomputed in backward).
        activation: "gelu", "gelu_tanh", "relu", "silu", "tanh", or a callable on tensors.
        dropout: dropout probability on the hidden activation, in training.
        bias: biases on both linear layers.
    """

    def __init__(self, dim: int, hidden: int, chunks: int, *, activation: Union[str, Callable] = "gelu",
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.dim = _check_int("dim", dim, minimum=1)
        self.hidden = _check_int("hidden", hidden, minimum=1)
        self.chunks = _check_int("chunks", chunks, minimum=1)
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
            self.activation_name, self._act = activation, ACTIVATIONS[activation]
        elif callable(activation):
            self.activation_name, self._act = getattr(activation, "__name__", type(activation).__name__), activation
        else:
            raise TypeError(f"activation must be a str or a callable, got {type(activation).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.dropout = float(dropout)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, dim, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, chunks={self.chunks}, activation={self.activation_name}, "
                f"dropout={self.dropout}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, L, dim={self.dim}), got shape {tuple(x.shape)}")
        weights = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        if x.shape[1] == 0:
            return _feed_forward(x, *weights, self._act, self.dropout, self.training)
        if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
            return _ChunkedFeedForwardFunction.apply(x, *weights, self._act, self.dropout, self.training, self.chunks)
        return torch.cat([_feed_forward(x[:, s:e], *weights, self._act, self.dropout, self.training)
                          for s, e in chunk_bounds(x.shape[1], self.chunks)], dim=1)
