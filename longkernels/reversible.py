"""Reversible residual layers (RevNet, Reformer): activation memory that does not grow with depth.

    >>> blocks = [longkernels.ReversibleBlock(attention, feed_forward) for _ in range(depth)]
    >>> model = longkernels.ReversibleSequence(blocks, stream_dtype=torch.float32)
    >>> y = model(x)                                # x enters as (x, x), leaves as (y1 + y2) / 2
    >>> y1, y2 = model(x1, x2)                      # or pass, and get back, the two streams yourself
    >>> y = model(x, f_kwargs={"key_padding_mask": mask})          # extra arguments of every F
    >>> y = model(x, f_kwargs=[{"memory": m} for m in memories])   # or one dict per block

The math (docs/semantics.md §3): a block maps ``(x1, x2)`` to ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``
and is inverted by ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``. ``ReversibleSequence(..., reversible=False)``
runs the very same computation as a plain sequence with ordinary autograd: it is the parity target.

The reversible path is one ``torch.autograd.Function`` over the whole stack. Its forward runs without a
graph and saves only the final pair ``(y1, y2)`` (plus the tensors of the extra arguments), and per block
the CPU and CUDA RNG states seen by F and G (as ``torch.utils.checkpoint`` records them), the autocast
state, and the replay state of every submodule that implements the replay protocol. Its backward walks
the blocks in reverse: it recomputes ``G(y1)`` with grad enabled under G's RNG state, backpropagates it,
reconstructs ``x2``, then does the same for ``F`` and ``x1``. Peak activation memory is one F or G.

Choices (where the semantics leave them open):

* **Input and output.** One tensor ``x`` enters as ``(x, x)`` and leaves as ``(y1 + y2) / 2``
  (Reformer's convention); ``model(x1, x2)`` returns ``(y1, y2)``. The feature dimension is never split,
  so any last dimension works. Outputs have the dtype of the input(s).
* **Extra arguments** go through ``f_kwargs=`` / ``g_kwargs=``: one dict for every block, or a list with
  one dict per block (per-layer memories). Their tensors (at any nesting, via pytree) are inputs of the
  autograd Function: those that require grad get their gradient, summed over every block that uses
  them; the rest (masks) are passed through.
* **Side outputs.** F may return ``(out, side)`` (e.g. a memory block's new memory). Then the sequence
  returns ``(output, sides)`` with ``sides[i]`` the side output of block ``i``'s F (None for blocks whose
  F returned a plain tensor), detached. G must return a tensor. A recomputation's side outputs are dropped.
* **Stream dtype.** With ``stream_dtype`` (e.g. float32) the residual streams ``x1``, ``x2`` and the
  stored pair are kept in that dtype while F and G compute in their own dtype (that of their first
  floating-point parameter, else buffer, else the stream's): their inputs are cast to it and their
  outputs cast back. Reconstruction in bfloat16 drifts by a bf16 rounding per block; in a float32 stream
  it drifts only where a float32 round-off flips the bf16 rounding of an F/G input (rare, but it adds
  up: ~1e-4 to 2e-3 relative after 48 blocks, growing with the tensor size); for bfloat16 blocks a
  float64 stream reconstructs exactly (a float32 input plus bf16 outputs fit in 53 bits), at the cost
  of a float64 final pair (memory that does not grow with depth) and float64 residual adds. Blocks
  that are discontinuous in their input (LSH hashing: a position changes bucket) turn any
  reconstruction error into an O(1) error in a few rows: bf16 LSH blocks want a float64 stream, or:
* **Fixed-point streams** (``fixed_point=True``, float32 or float64 stream): the entering streams and
  every F/G output are rounded to multiples of ``2**-16`` before the residual adds, so every add is
  exact (a float32 holds any multiple of ``2**-16`` below 256 exactly) and the backward's
  subtraction rebuilds each input bit for bit at any depth: reconstruction drift is zero, in a
  float32 stream, for bf16 blocks, LSH included (RevNet-style fixed-point arithmetic, in floats). The
  price: one rounding of each branch output to an absolute ``2**-17`` (far below a bf16 output's own
  rounding), straight-through for gradients in both modes, and a few elementwise passes.
* **Parameters are inputs of the Function** and their gradients are returned by its backward (they
  are not accumulated behind autograd's back, as reentrant checkpointing does), so
  ``torch.autograd.grad`` and ``DistributedDataParallel`` (also with ``find_unused_parameters=True``)
  see them like any other. The gradients of the whole stack are handed to autograd at the end of the
  backward: with ``zero_grad(set_to_none=True)`` (the default) they become ``.grad`` without a copy.
* **Without grad** (``torch.no_grad()``, or nothing requiring grad) both modes run the plain loop.

What F and G must satisfy: given the same inputs, RNG state and replay state, they compute the same
outputs (deterministic kernels); state they update in a forward (BatchNorm running statistics, caches)
is updated again by the recomputation, as with ``torch.utils.checkpoint``.

Replay protocol: after F (resp. G) runs in the forward, every submodule ``m`` of it that has a method
``_get_replay_state`` is asked for ``m._get_replay_state()``; before the recomputation each is handed it
back with ``m._set_replay_state(state)``, a one-shot order to reuse it in its next forward
(``longkernels.nn.LSHSelfAttention`` replays its rotations so). A module that replays something it drew
from torch's RNG must still consume the RNG as its forward did, or later random draws of the same F
(dropout) see a shifted stream and gradients are no longer exact; the backward checks that each
recomputation left torch's generators where the forward left them and warns (RuntimeWarning) if not.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils import _pytree as pytree

__all__ = ["ReversibleBlock", "ReversibleSequence"]

KwargsArg = Union[None, dict, Sequence[Optional[dict]]]


# --------------------------------------------------------------------------------------------
# RNG and autocast state: what torch.utils.checkpoint records, per function call
# --------------------------------------------------------------------------------------------
def rng_devices(tensors: Iterable[torch.Tensor]) -> list[int]:
    """CUDA devices whose generators a recomputation must restore: those of the tensors, once CUDA
    is initialised (checkpoint's rule; a process that never touched CUDA has no state to keep)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.is_cuda})


class RngState:
    """The CPU generator's state and that of each CUDA device in ``devices``."""

    __slots__ = ("cpu", "devices", "cuda")

    def __init__(self, devices: list[int]):
        self.cpu = torch.get_rng_state()
        self.devices = devices
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def restored(self):
        """Runs the body with the generators as recorded; the caller's RNG stream is left untouched."""
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            yield

    def is_current(self) -> bool:
        """Whether the generators are now where they were when this state was recorded."""
        return torch.equal(torch.get_rng_state(), self.cpu) and all(
            torch.equal(torch.cuda.get_rng_state(d), state) for d, state in zip(self.devices, self.cuda))


def _check_rng_consumption(after: "RngState", name: str) -> None:
    """A recomputation must draw exactly the random numbers its forward drew; otherwise every draw after
    the difference (dropout) differs and the gradients are silently wrong. Costs one state copy."""
    if not after.is_current():
        warnings.warn(f"{name} drew a different amount of random numbers from torch's RNG in the backward's "
                      f"recomputation than in the forward, so its random draws (dropout masks) differ and the "
                      f"gradients are not exact. A module that replays state (_set_replay_state) must consume "
                      f"the RNG as its forward did.", RuntimeWarning, stacklevel=2)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


@contextlib.contextmanager
def _autocast_restored(state):
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in state:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
        yield


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
def _compute_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def _replayable(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if callable(getattr(m, "_get_replay_state", None))]


def _call(fn: nn.Module, name: str, x: torch.Tensor, kwargs: dict, allow_side: bool, cast: bool = True):
    """``fn(x, **kwargs)`` in ``fn``'s dtype, its output back in ``x``'s (the stream's): (out, side).
    ``cast=False`` returns the output in ``fn``'s dtype (the backward fuses the cast into the coupling)."""
    dtype = _compute_dtype(fn)
    inp = x if dtype is None or dtype == x.dtype else x.to(dtype)
    out = fn(inp, **kwargs)
    side = None
    if isinstance(out, tuple) and allow_side:
        if len(out) != 2:
            raise ValueError(f"{name} returned a tuple of {len(out)} items; a function with a side output "
                             f"must return (out, side)")
        out, side = out
    if not isinstance(out, torch.Tensor):
        what = "a tensor or (tensor, side)" if allow_side else "a tensor (only F may return a side output)"
        raise TypeError(f"{name} must return {what}, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must preserve its input's shape {tuple(x.shape)}, returned {tuple(out.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"{name} returned a {out.dtype} tensor; a residual branch must be floating-point")
    return (out.to(x.dtype) if cast else out), side


# --------------------------------------------------------------------------------------------
# Fixed-point residual streams: every stream value a multiple of 2**-bits, so each residual add is
# exact and the backward's subtraction rebuilds the input bit for bit
# --------------------------------------------------------------------------------------------
def _snap(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``v`` rounded (half to even) to the nearest multiple of ``2**-bits``; scaling by a power of two is
    exact, so this is one rounding."""
    scale = 2.0 ** bits
    return torch.round(v * scale) / scale


class _SnapToGrid(torch.autograd.Function):
    """``_snap`` with the identity as its gradient (straight-through), as the reversible backward sees it."""

    @staticmethod
    def forward(ctx, v, bits):
        return _snap(v, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _on_grid(v: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    if bits is None:
        return v
    return _SnapToGrid.apply(v, bits) if v.requires_grad and torch.is_grad_enabled() else _snap(v, bits)


class ReversibleBlock(nn.Module):
    """One reversible residual block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

    ``f`` and ``g`` are any modules mapping a tensor to one of the same shape (typically attention and
    feed-forward, each with its own pre-norm). ``f`` may return ``(out, side)``; see
    :class:`ReversibleSequence`. Called on its own, a block runs the plain computation with autograd
    and returns ``(y1, y2)``, or ``((y1, y2), side)`` when ``f`` returned a side output.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        for name, fn in (("f", f), ("g", g)):
            if not isinstance(fn, nn.Module):
                raise TypeError(f"ReversibleBlock: {name} must be an nn.Module, got {type(fn).__name__}")
        self.f = f
        self.g = g

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, f_kwargs: Optional[dict] = None,
                g_kwargs: Optional[dict] = None):
        y1, y2, side = self._forward(x1, x2, f_kwargs or {}, g_kwargs or {})
        return (y1, y2) if side is None else ((y1, y2), side)

    def _forward(self, x1, x2, f_kwargs, g_kwargs, index: int = 0, bits: Optional[int] = None):
        fx, side = _call(self.f, f"F of block {index}", x2, f_kwargs, allow_side=True)
        y1 = x1 + _on_grid(fx, bits)
        del fx
        gy, _ = _call(self.g, f"G of block {index}", y1, g_kwargs, allow_side=False)
        y2 = x2 + _on_grid(gy, bits)
        return y1, y2, side

    @torch.no_grad()
    def inverse(self, y1: torch.Tensor, y2: torch.Tensor, *, f_kwargs: Optional[dict] = None,
                g_kwargs: Optional[dict] = None, bits: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``: exact only where f and g are deterministic.
        ``bits``: the fixed-point grid of the streams (see :class:`ReversibleSequence`)."""
        x2 = y2 - _on_grid(_call(self.g, "G", y1, g_kwargs or {}, allow_side=False)[0], bits)
        x1 = y1 - _on_grid(_call(self.f, "F", x2, f_kwargs or {}, allow_side=True)[0], bits)
        return x1, x2


# --------------------------------------------------------------------------------------------
# Extra arguments: templates whose tensor leaves travel as inputs of the autograd Function
# --------------------------------------------------------------------------------------------
class _Arguments:
    """Per-block f/g keyword arguments with their distinct tensors pulled out (deduplicated by identity,
    so a mask shared by every block is one input of the Function, whose gradient sums over blocks)."""

    def __init__(self, f_kwargs: list[dict], g_kwargs: list[dict]):
        self.tensors: list[torch.Tensor] = []
        index: dict[int, int] = {}
        self.templates = []
        for kw in list(f_kwargs) + list(g_kwargs):
            leaves, spec = pytree.tree_flatten(kw)
            slots = []
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    if id(leaf) not in index:
                        index[id(leaf)] = len(self.tensors)
                        self.tensors.append(leaf)
                    slots.append(("t", index[id(leaf)]))
                else:
                    slots.append(("v", leaf))
            self.templates.append((spec, slots))
        self.n_blocks = len(f_kwargs)
        self.used = [sorted({s[1] for s in slots if s[0] == "t"}) for _, slots in self.templates]

    def build(self, tensors: Sequence[torch.Tensor]) -> tuple[list[dict], list[dict]]:
        out = [pytree.tree_unflatten([tensors[v] if k == "t" else v for k, v in slots], spec)
               for spec, slots in self.templates]
        return out[:self.n_blocks], out[self.n_blocks:]

    def drop_tensors(self) -> None:
        self.tensors = []  # the Function saves them (save_for_backward); no second reference here


class _BlockRecord:
    __slots__ = ("rng_f", "rng_g", "rng_end", "replay_f", "replay_g")


# --------------------------------------------------------------------------------------------
# The autograd Function of the whole stack
# --------------------------------------------------------------------------------------------
def _grads(out: torch.Tensor, grad_out: torch.Tensor, inputs: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """d<out, grad_out>/d inputs (None where an input is unused or needs no grad)."""
    live = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    result: list[Optional[torch.Tensor]] = [None] * len(inputs)
    if not live or not out.requires_grad:
        return result
    got = torch.autograd.grad(out, [inputs[i] for i in live], grad_out, allow_unused=True)
    for i, g in zip(live, got):
        result[i] = g
    return result


def _add(acc: Optional[torch.Tensor], g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Out of place: a gradient autograd hands back may alias the incoming one (an identity path), and
    # the incoming dy1 and dy2 may be one tensor (the backward of (y1 + y2) / 2).
    if g is None:
        return acc
    return g if acc is None else acc + g


def _branch_grads(out: torch.Tensor, grad_out: torch.Tensor, inputs: list[torch.Tensor]):
    """``_grads`` of a branch output ``out`` left in the branch's dtype: the incoming stream gradient is
    cast to it, which is exactly what the backward of the dropped ``out.to(stream)`` would do. Returns
    (grads, exposed): exposed says whether ``grad_out`` itself was handed to autograd (which may return
    it, or keep it, as some gradient), rather than a cast copy of it."""
    if out.dtype == grad_out.dtype:
        return _grads(out, grad_out, inputs), True
    if not out.requires_grad:
        return _grads(out, grad_out, inputs), False
    return _grads(out, grad_out.to(out.dtype), inputs), False


def _fused_coupling(y: torch.Tensor, fy: torch.Tensor) -> bool:
    """Whether the backward's coupling goes through the fused C++ kernel: CPU tensors whose branch output
    comes in another dtype than the stream's (the kernel fuses the cast; with no cast it only ties the torch
    ops: docs/decisions.md, "Reversible coupling kernel")."""
    return (y.device.type == "cpu" and fy.dtype != y.dtype and y.dtype in (torch.float32, torch.float64)
            and _ops_coupling() is not None)


def _ops_coupling():
    from . import _ext
    if not _ext.available():
        return None
    from .ops import reversible_coupling
    return reversible_coupling


def _couple(y: torch.Tensor, fy: torch.Tensor, dy: Optional[torch.Tensor], dgrad: Optional[torch.Tensor],
            owned: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """``x = y - fy.to(stream)`` and ``dy + dgrad``, bitwise as the plain expressions; the sum goes into
    ``dy`` in place when ``owned`` (a tensor this backward made and never handed to autograd). Returns
    (x, dy, whether the returned dy is owned)."""
    if dgrad is None or dy is None:
        return y - fy.to(y.dtype), (dy if dgrad is None else dgrad), owned if dgrad is None else False
    if _fused_coupling(y, fy):
        x, dy = _ops_coupling().reversible_coupling(y, fy, dy, dgrad, inplace=owned, backend="cpu")
        return x, dy, True
    x = y - fy.to(y.dtype)
    return x, (dy.add_(dgrad) if owned else dy + dgrad), True


class _Plan:
    """What the Function needs besides tensors: the blocks, the arguments' templates, which parameters
    (by position among the Function's inputs) belong to which F and G, and a slot for side outputs."""

    def __init__(self, blocks: Sequence[ReversibleBlock], args: _Arguments, params: list[nn.Parameter],
                 bits: Optional[int] = None):
        self.bits = bits
        self.blocks = blocks
        self.args = args
        self.params = params
        where = {id(p): i for i, p in enumerate(params)}
        self.f_params = [[where[id(p)] for p in b.f.parameters() if id(p) in where] for b in blocks]
        self.g_params = [[where[id(p)] for p in b.g.parameters() if id(p) in where] for b in blocks]
        self.sides: list = []


def _half_step(plan: _Plan, fn: nn.Module, name: str, inp: torch.Tensor, kwargs: dict, rng: RngState,
               rng_after: RngState, replay: list, param_ids: list[int], arg_ids: list[int], leaves: list,
               out: torch.Tensor, d_out: torch.Tensor, d_in: Optional[torch.Tensor], own_out: bool, own_in: bool,
               param_grads: list, arg_grads: list):
    """One half of a block's backward, for ``out = other + fn(inp)``: recompute ``fn(inp)`` under its
    recorded RNG and replay state, backpropagate ``d_out`` through it (parameter and argument gradients
    accumulated), rebuild ``other = out - fn(inp)`` and add the input gradient into ``d_in``.
    Returns ``(other, inp detached, d_in, own_in, own_out)``; ``own_*`` say whether the backward owns
    (may update in place) the running gradients."""
    for m, state in replay:
        m._set_replay_state(state)
    with torch.enable_grad(), rng.restored():
        inp_ = inp.requires_grad_()
        branch, _ = _call(fn, name, inp_, kwargs, allow_side=True, cast=False)
        _check_rng_consumption(rng_after, name)
    wrt = [inp_] + [plan.params[j] for j in param_ids] + [leaves[j] for j in arg_ids]
    got, exposed = _branch_grads(branch, d_out, wrt)
    own_out = own_out and not exposed
    with torch.no_grad():
        if plan.bits is not None:
            branch = _snap(branch.to(out.dtype), plan.bits)
        other, d_in, own_in = _couple(out, branch, d_in, got[0], own_in)
    del branch
    for j, g in zip(param_ids, got[1:]):
        param_grads[j] = _add(param_grads[j], g)
    for j, g in zip(arg_ids, got[1 + len(param_ids):]):
        arg_grads[j] = _add(arg_grads[j], g)
    return other, inp_.detach(), d_in, own_in, own_out


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, n_args: int, x1: torch.Tensor, x2: torch.Tensor, *tensors):
        arg_tensors = tensors[:n_args]
        f_kws, g_kws = plan.args.build(arg_tensors)
        devices = rng_devices([x1, x2, *arg_tensors])
        records = []
        for i, block in enumerate(plan.blocks):
            rec = _BlockRecord()
            rec.rng_f = RngState(devices)
            fx, side = _call(block.f, f"F of block {i}", x2, f_kws[i], allow_side=True)
            rec.replay_f = [(m, m._get_replay_state()) for m in _replayable(block.f)]
            y1 = x1 + (fx if plan.bits is None else _snap(fx, plan.bits))
            del fx
            rec.rng_g = RngState(devices)
            gy, _ = _call(block.g, f"G of block {i}", y1, g_kws[i], allow_side=False)
            rec.replay_g = [(m, m._get_replay_state()) for m in _replayable(block.g)]
            y2 = x2 + (gy if plan.bits is None else _snap(gy, plan.bits))
            del gy
            plan.sides.append(side)
            if records:
                records[-1].rng_end = rec.rng_f
            records.append(rec)
            x1, x2 = y1, y2
        records[-1].rng_end = RngState(devices)  # where G of the last block left the generators
        plan.args.drop_tensors()
        ctx.plan, ctx.records, ctx.n_args = plan, records, n_args
        ctx.autocast = _autocast_state()
        ctx.save_for_backward(x1, x2, *arg_tensors)
        return x1, x2

    @staticmethod
    @once_differentiable
    def backward(ctx, dy1: torch.Tensor, dy2: torch.Tensor):
        plan, records, n_args = ctx.plan, ctx.records, ctx.n_args
        y1, y2, *arg_tensors = ctx.saved_tensors
        arg_need = ctx.needs_input_grad[4:4 + n_args]
        leaves = [t.detach().requires_grad_(need) for t, need in zip(arg_tensors, arg_need)]
        f_kws, g_kws = plan.args.build(leaves)
        n_f = len(plan.blocks)
        arg_grads: list[Optional[torch.Tensor]] = [None] * n_args
        param_grads: list[Optional[torch.Tensor]] = [None] * len(plan.params)
        y1, y2 = y1.detach(), y2.detach()
        # dy1 and dy2 come from autograd (and may be one tensor): accumulated out of place until this
        # backward owns a fresh one that autograd has not seen; then in place (no fresh output per block).
        own1 = own2 = False
        with _autocast_restored(ctx.autocast):
            for i in reversed(range(n_f)):
                block, rec = plan.blocks[i], records[i]
                # G: recompute on y1, backpropagate dy2, reconstruct x2 = y2 - G(y1), dy1 += dG/dy1.
                x2, y1, dy1, own1, own2 = _half_step(
                    plan, block.g, f"G of block {i}", y1, g_kws[i], rec.rng_g, rec.rng_end, rec.replay_g,
                    plan.g_params[i], plan.args.used[n_f + i], leaves, y2, dy2, dy1, own2, own1,
                    param_grads, arg_grads)
                # F: recompute on x2, backpropagate dy1 (now the total), reconstruct x1 = y1 - F(x2).
                x1, x2, dy2, own2, own1 = _half_step(
                    plan, block.f, f"F of block {i}", x2, f_kws[i], rec.rng_f, rec.rng_g, rec.replay_f,
                    plan.f_params[i], plan.args.used[i], leaves, y1, dy1, dy2, own1, own2,
                    param_grads, arg_grads)
                y1, y2 = x1, x2
        return (None, None, dy1, dy2, *arg_grads, *param_grads)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
def _as_blocks(blocks) -> list[ReversibleBlock]:
    if isinstance(blocks, (ReversibleBlock, torch.Tensor)) or not isinstance(blocks, Iterable):
        raise TypeError(f"blocks must be an iterable of ReversibleBlock, got {type(blocks).__name__}")
    blocks = list(blocks)
    for i, b in enumerate(blocks):
        if not isinstance(b, ReversibleBlock):
            hint = (" (wrap a pair of modules as ReversibleBlock(f, g))" if isinstance(b, nn.Module) else "")
            raise TypeError(f"blocks[{i}] must be a ReversibleBlock, got {type(b).__name__}{hint}")
    if not blocks:
        raise ValueError("a ReversibleSequence needs at least one block")
    return blocks


class ReversibleSequence(nn.Module):
    """Reversible blocks run in order, their activations recomputed in the backward (see the module doc).

    Args:
        blocks: an iterable of :class:`ReversibleBlock`.
        reversible: False runs the same blocks as a plain sequence with ordinary autograd (saving every
            activation): the reference the reversible path is tested against.
        stream_dtype: floating dtype of the residual streams (e.g. ``torch.float32`` around bfloat16
            blocks); None: the input's dtype.
        fixed_point: keep the streams on a fixed-point grid, so that the backward rebuilds every
            block's input bit for bit at any depth: the entering streams and every F/G output are
            rounded to a multiple of ``2**-bits`` (``True``: bits = 16; or an int), which makes each
            residual add exact while the stream's magnitude stays below ``2**(p - bits)`` (p = 24 for a
            float32 stream: 256 with 16 bits; 53 for float64). The rounding is straight-through for
            gradients, in both modes. Needs a float32 or float64 stream. Larger values still work,
            with ordinary float round-off in their adds.

    ``forward(x, x2=None, *, f_kwargs=None, g_kwargs=None)``: with ``x`` alone returns
    ``(y1 + y2) / 2`` for the streams ``(x, x)``; with ``x2`` returns ``(y1, y2)``. ``f_kwargs`` /
    ``g_kwargs``: a dict passed to every block's F / G, or a list of one dict (or None) per block. When
    any F returns ``(out, side)`` the result is ``(output, sides)``, ``sides`` a list with one detached
    entry per block.
    """

    def __init__(self, blocks: Iterable[ReversibleBlock], *, reversible: bool = True,
                 stream_dtype: Optional[torch.dtype] = None, fixed_point: Union[bool, int] = False):
        super().__init__()
        if fixed_point is True:
            fixed_point = 16
        elif fixed_point is False:
            fixed_point = None
        elif isinstance(fixed_point, int):
            if not 1 <= fixed_point <= 60:
                raise ValueError(f"fixed_point must be a bool or a number of fraction bits in [1, 60], "
                                 f"got {fixed_point}")
        else:
            raise TypeError(f"fixed_point must be a bool or an int, got {type(fixed_point).__name__}")
        if fixed_point is not None and stream_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"fixed_point needs a float32 or float64 stream, got stream_dtype={stream_dtype}")
        self.fixed_point = fixed_point
        if not isinstance(reversible, bool):
            raise TypeError(f"reversible must be a bool, got {type(reversible).__name__}")
        if stream_dtype is not None:
            if not isinstance(stream_dtype, torch.dtype):
                raise TypeError(f"stream_dtype must be a torch.dtype or None, got {type(stream_dtype).__name__} "
                                f"({stream_dtype!r})")
            if not stream_dtype.is_floating_point:
                raise ValueError(f"stream_dtype must be a floating-point dtype, got {stream_dtype}")
        self.blocks = nn.ModuleList(_as_blocks(blocks))
        self.reversible = reversible
        self.stream_dtype = stream_dtype

    def extra_repr(self) -> str:
        fixed = "" if self.fixed_point is None else f", fixed_point={self.fixed_point}"
        return f"reversible={self.reversible}, stream_dtype={self.stream_dtype}{fixed}"

    def _per_block(self, kwargs: KwargsArg, name: str) -> list[dict]:
        n = len(self.blocks)
        if kwargs is None:
            return [{} for _ in range(n)]
        if isinstance(kwargs, dict):
            per = [kwargs] * n
        elif isinstance(kwargs, (list, tuple)):
            if len(kwargs) != n:
                raise ValueError(f"{name} as a list needs one dict per block ({n}), got {len(kwargs)}")
            per = [{} if kw is None else kw for kw in kwargs]
        else:
            raise TypeError(f"{name} must be a dict, a list of one dict per block, or None, "
                            f"got {type(kwargs).__name__}")
        for i, kw in enumerate(per):
            if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
                raise TypeError(f"{name}[{i}] must be a dict with str keys, got {kw!r:.80}")
        return per

    def _streams(self, x, x2):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x2 is not None:
            if not isinstance(x2, torch.Tensor):
                raise TypeError(f"x2 must be a torch.Tensor or None, got {type(x2).__name__}")
            if x2.shape != x.shape or x2.device != x.device or x2.dtype != x.dtype:
                raise ValueError(f"x2 must match x in shape, dtype and device: x {tuple(x.shape)} {x.dtype} "
                                 f"{x.device}, x2 {tuple(x2.shape)} {x2.dtype} {x2.device}")
        dtype = self.stream_dtype or x.dtype
        a, b = x.to(dtype), (x if x2 is None else x2).to(dtype)
        if self.fixed_point is not None:
            if dtype not in (torch.float32, torch.float64):
                raise ValueError(f"fixed_point needs a float32 or float64 stream; the stream would be {dtype} "
                                 f"(set stream_dtype=torch.float32)")
            a = _on_grid(a, self.fixed_point)
            b = a if x2 is None else _on_grid(b, self.fixed_point)
        return a, b

    def forward(self, x: torch.Tensor, x2: Optional[torch.Tensor] = None, *, f_kwargs: KwargsArg = None,
                g_kwargs: KwargsArg = None):
        in_dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x1, s2 = self._streams(x, x2)
        f_kws, g_kws = self._per_block(f_kwargs, "f_kwargs"), self._per_block(g_kwargs, "g_kwargs")
        args = _Arguments(f_kws, g_kws)
        params = list({id(p): p for p in self.parameters() if p.requires_grad}.values())
        needs_grad = torch.is_grad_enabled() and (
            x1.requires_grad or s2.requires_grad or bool(params)
            or any(t.requires_grad for t in args.tensors))
        if self.reversible and needs_grad:
            plan = _Plan(list(self.blocks), args, params, self.fixed_point)
            n_args = len(args.tensors)
            y1, y2 = _ReversibleFunction.apply(plan, n_args, x1, s2, *args.tensors, *params)
            sides = plan.sides
            plan.sides = []
        else:
            sides = []
            for i, block in enumerate(self.blocks):
                x1, s2, side = block._forward(x1, s2, f_kws[i], g_kws[i], i, self.fixed_point)
                sides.append(side)
            y1, y2 = x1, s2
        out = (y1.to(in_dtype), y2.to(in_dtype)) if x2 is not None else ((y1 + y2) / 2).to(in_dtype)
        if any(s is not None for s in sides):
            sides = [pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, s)
                     for s in sides]
            return out, sides
        return out

    @torch.no_grad()
    def inverse(self, y1: torch.Tensor, y2: torch.Tensor, *, f_kwargs: KwargsArg = None,
                g_kwargs: KwargsArg = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The input streams ``(x1, x2)`` reconstructed from the output streams, as the backward does
        (in the stream dtype, returned in ``y1``'s dtype). Exact only for deterministic blocks (eval
        mode, fixed LSH rotations): it replays no RNG state. Useful to measure reconstruction drift."""
        in_dtype = y1.dtype
        a, b = self._streams(y1, y2)
        f_kws, g_kws = self._per_block(f_kwargs, "f_kwargs"), self._per_block(g_kwargs, "g_kwargs")
        for i in reversed(range(len(self.blocks))):
            a, b = self.blocks[i].inverse(a, b, f_kwargs=f_kws[i], g_kwargs=g_kws[i], bits=self.fixed_point)
        return a.to(in_dtype), b.to(in_dtype)
