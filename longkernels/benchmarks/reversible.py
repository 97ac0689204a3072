"""Reversible stacks against depth (docs/semantics.md §3): time (forward+backward) and activation memory.

Three implementations of the same blocks (the same weights, drawn from one seed), measured together:

* ``longkernels-reversible``: ``longkernels.ReversibleSequence`` (activations rebuilt from the outputs);
* ``plain``: ``ReversibleSequence(..., reversible=False)``, ordinary autograd (every activation saved);
* ``checkpoint``: the plain blocks with ``torch.utils.checkpoint`` around each (``use_reentrant=True``: it
  saves each block's two input streams through ``save_for_backward``, so the saved-tensor hooks see
  exactly what it keeps; the non-reentrant variant keeps them out of sight).

Variants (the blocks):

* ``mlp``: F and G pre-norm feed-forwards ``LayerNorm -> Linear(dim, hidden) -> GELU -> Dropout(0.1) ->
  Linear(hidden, dim)``: attention-free, so the depth trend is not hidden by attention kernels, and the
  dropout makes the RNG-state bookkeeping part of what is timed;
* ``lsh``: F = pre-norm ``longkernels.nn.LSHSelfAttention`` (4 heads, chunk 64, 2 hashes), G = pre-norm
  ``ChunkedFeedForward`` (4 chunks): Reformer's block.

The summary adds the ratios against plain and checkpoint per depth, saved bytes deepest / shallowest, and
the reconstruction drift of the deepest stack (``ReversibleSequence.inverse`` after the forward, eval mode)
for bfloat16 blocks in a float32, a fixed-point float32, a float64 and a bfloat16 stream.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from ..nn import ChunkedFeedForward, LSHSelfAttention, PreNorm
from ..reversible import ReversibleBlock, ReversibleSequence
from .base import Implementation, Operation, Sweep, dtype_name

WEIGHT_SEED = 0
STEP_SEED = 0  # the forward's RNG (dropout), the same for every implementation and step


@dataclasses.dataclass(frozen=True)
class ReversibleCase:
    mode: str
    dtype: torch.dtype
    depth: int
    variant: str = "mlp"
    dim: int = 256
    batch: int = 2
    length: int = 256

    op: ClassVar[str] = "reversible"
    sweep_name: ClassVar[str] = "depth (blocks)"

    @property
    def hidden(self) -> int:
        return 4 * self.dim if self.variant == "mlp" else 2 * self.dim

    @property
    def sweep(self) -> int:
        return self.depth

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{self.mode}-{dtype_name(self.dtype)}-depth{self.depth}"

    @property
    def shape(self) -> str:
        return f"{self.variant} x{self.depth} B{self.batch} L{self.length} dim{self.dim} hidden{self.hidden}"

    def flops(self) -> Optional[float]:
        """MLP blocks: two branches of two linear layers, 2 * 2 * B * L * dim * hidden each, per block; fwd+bwd
        3x (dX and dW), the plain sequence's count for all (the reversible recomputation is overhead, not
        work). LSH blocks: time only."""
        if self.variant != "mlp":
            return None
        return 3.0 * 2 * 2 * 2 * self.batch * self.length * self.dim * self.hidden * self.depth

    def make_inputs(self, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.length, self.dim, generator=g).to(device=device, dtype=self.dtype)
        return dict(x=x.requires_grad_(True))


def reversible_cases(depths: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str],
                     variants: Sequence[str]) -> list:
    return [ReversibleCase("fwdbwd", dtype, depth=d, variant=v) for v in variants for dtype in dtypes
            for d in sorted(depths)]


def make_blocks(kind: str, depth: int, dim: int, hidden: int, *, dropout: float = 0.1, heads: int = 4,
                chunk_size: int = 64, seed: int = WEIGHT_SEED) -> list:
    """``depth`` blocks of ``kind`` ("mlp" or "lsh"), weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        for _ in range(depth):
            if kind == "mlp":
                def ff():
                    return PreNorm(dim, nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                                      nn.Linear(hidden, dim)))
                blocks.append(ReversibleBlock(ff(), ff()))
            elif kind == "lsh":
                blocks.append(ReversibleBlock(
                    PreNorm(dim, LSHSelfAttention(dim, heads, chunk_size=chunk_size, n_hashes=2, dropout=0.0)),
                    PreNorm(dim, ChunkedFeedForward(dim, hidden, chunks=4, dropout=dropout))))
            else:
                raise ValueError(f"unknown block kind {kind!r} (mlp, lsh)")
    return blocks


class CheckpointSequence(nn.Module):
    """The plain sequence with torch.utils.checkpoint around every block (same math)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x1 = x2 = x
        for block in self.blocks:
            x1, x2 = checkpoint(block, x1, x2, use_reentrant=True)
        return (x1 + x2) / 2


def build_stack(impl: str, blocks, stream_dtype=None) -> nn.Module:
    if impl == "reversible":
        return ReversibleSequence(blocks, stream_dtype=stream_dtype)
    if impl == "plain":
        return ReversibleSequence(blocks, reversible=False, stream_dtype=stream_dtype)
    if impl == "checkpoint":
        return CheckpointSequence(blocks)
    raise ValueError(f"unknown implementation {impl!r} (reversible, plain, checkpoint)")


class Stack(Implementation):
    def __init__(self, kind: str):
        self.kind = kind
        self.name = "longkernels-reversible" if kind == "reversible" else kind
        self.peer = kind != "reversible"
        self.note = {"reversible": "longkernels.ReversibleSequence",
                     "plain": "the same blocks as a plain sequence (ReversibleSequence(reversible=False))",
                     "checkpoint": "the plain blocks, torch.utils.checkpoint(use_reentrant=True) per block"}[kind]

    def build(self, case, device):
        blocks = make_blocks(case.variant, case.depth, case.dim, case.hidden)
        model = build_stack(self.kind, blocks).to(device=device, dtype=case.dtype)

        def fn(x):
            torch.manual_seed(STEP_SEED)  # the same dropout masks for every implementation
            return model(x)
        fn.zero_grad = lambda: model.zero_grad(set_to_none=True)
        fn.module = model
        return fn


def reconstruction_error(kind: str, depth: int, dim: int, hidden: int, batch: int, length: int, device,
                         module_dtype, stream_dtype, fixed_point=False) -> float:
    """Relative error of ``inverse(forward(x))`` over both streams, eval mode (deterministic blocks;
    LSH with fixed rotations: a seed)."""
    blocks = make_blocks(kind, depth, dim, hidden, dropout=0.0)
    for b in blocks:
        for m in b.modules():
            if isinstance(m, LSHSelfAttention):
                m.seed = 0
    seq = ReversibleSequence(blocks, stream_dtype=stream_dtype, fixed_point=fixed_point).to(
        device=device, dtype=module_dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, length, dim, generator=g).to(device=device, dtype=stream_dtype or module_dtype)
    with torch.no_grad():
        y1, y2 = seq(x, x)
        a, b = seq.inverse(y1, y2)
        err = (torch.cat([a, b]).double() - torch.cat([x, x]).double()).norm() / (2 ** 0.5 * x.double().norm())
    return err.item()


RECONSTRUCTIONS = {
    "bfloat16 blocks, float32 stream": (torch.bfloat16, torch.float32, False),
    "bfloat16 blocks, float32 fixed-point stream": (torch.bfloat16, torch.float32, True),
    "bfloat16 blocks, float64 stream": (torch.bfloat16, torch.float64, False),
    "bfloat16 blocks, bfloat16 stream": (torch.bfloat16, None, False),
    "float32": (torch.float32, None, False),
}


def summarize(records: list, device) -> dict:
    """Ratios against plain and checkpoint per depth, saved bytes deepest / shallowest, reconstruction drift
    at the deepest depth of each variant; and the issue's targets, reported (not asserted)."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = {}
    for variant in sorted({r["variant"] for r in ok}):
        by = {(r["impl"], r["sweep"]): r for r in ok if r["variant"] == variant and r["dtype"] == "float32"}
        depths = sorted({d for _, d in by})
        if not depths:
            continue
        lo, hi = depths[0], depths[-1]
        rev = "longkernels-reversible"
        s = {"depths": depths}
        if (rev, lo) in by and (rev, hi) in by and by[rev, lo].get("saved_bytes"):
            s["reversible_saved_ratio_deepest_vs_shallowest"] = by[rev, hi]["saved_bytes"] / by[rev, lo]["saved_bytes"]
        for other in ("plain", "checkpoint"):
            s[f"time_reversible_over_{other}"] = {d: by[rev, d]["median_ms"] / by[other, d]["median_ms"]
                                                 for d in depths if (rev, d) in by and (other, d) in by}
        case = ReversibleCase("fwdbwd", torch.float32, depth=hi, variant=variant)
        s["reconstruction"] = {name: {"depth": hi, "error": reconstruction_error(
            variant, hi, case.dim, case.hidden, case.batch, case.length, device, mdt, sdt, fixed)}
            for name, (mdt, sdt, fixed) in RECONSTRUCTIONS.items()}
        targets = {}
        if "reversible_saved_ratio_deepest_vs_shallowest" in s:
            targets["saved bytes deepest <= 1.1x shallowest"] = s["reversible_saved_ratio_deepest_vs_shallowest"] <= 1.1
        if hi in s["time_reversible_over_plain"]:
            targets["time <= 1.4x plain (deepest)"] = s["time_reversible_over_plain"][hi] <= 1.4
        if hi in s["time_reversible_over_checkpoint"]:
            targets["time <= checkpoint (deepest)"] = s["time_reversible_over_checkpoint"][hi] <= 1.0
        fp = s["reconstruction"]["bfloat16 blocks, float32 fixed-point stream"]["error"]
        targets["bf16 blocks, fixed-point float32 stream: reconstruction <= 1e-3"] = fp <= 1e-3
        s["targets_met"] = targets
        out[variant] = s
    return out


OPERATION = Operation(
    name="reversible",
    make_cases=reversible_cases,
    implementations=(Stack("reversible"), Stack("plain"), Stack("checkpoint")),
    variants=("mlp", "lsh"),
    modes=("fwdbwd",),
    sweeps={"quick": Sweep((2, 4), dtypes=("float32",), variants=("mlp",)),
            "default": Sweep((2, 8, 24), dtypes=("float32",)),
            "full": Sweep((2, 4, 8, 16, 32, 48), dtypes=("float32",))},
    cuda_sweeps={"default": Sweep((2, 8), dtypes=("float32",))},
    flops_note="mlp blocks: 2 linear layers x 2 branches per block, 2*B*L*dim*hidden each, x3 for fwd+bwd; lsh: "
               "time only",
    summarize=summarize,
    plot_saved_bytes=True,
)
