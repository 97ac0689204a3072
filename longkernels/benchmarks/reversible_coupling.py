"""The coupling arithmetic of a reversible backward step: fused kernel against the unfused torch ops.

Per block and branch the backward of ``ReversibleSequence`` reconstructs ``x = y - fy`` and accumulates
``dy = dy + dgrad`` over the float32 residual stream; ``fy`` comes out of the branch in its compute dtype
(the case's dtype: float32 or bfloat16) and is cast to the stream's. Implementations:

* ``torch``: ``fy.to(stream)``, ``y - fy``, ``dy + dgrad``: three ops (two for a float32 branch), each
  with a fresh output; ``torch_add_``: the same with ``dy.add_(dgrad)`` in place;
* ``longkernels-fused``: ``longkernels.reversible_coupling`` (C++ on CPU, Triton on CUDA), one pass,
  fresh ``x`` and ``dy_out``; ``longkernels-fused-inplace``: ``dy_out`` written into ``dy``
  (``inplace=True``), as the backward uses it when it owns ``dy``.

A memory-bound operation: the table reports bytes moved per second (each input read once, each output
written once) beside the time.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch

from ..ops.reversible_coupling import not_supported_reasons, reversible_coupling
from .base import Implementation, Operation, Sweep, dtype_name

ROW = 1024  # elements per row of the (rows, 1024) stream


@dataclasses.dataclass(frozen=True)
class CouplingCase:
    mode: str
    dtype: torch.dtype  # the branch's dtype; the stream is float32
    elements: int
    variant: str = "float32-stream"

    op: ClassVar[str] = "reversible_coupling"
    sweep_name: ClassVar[str] = "stream elements"

    @property
    def sweep(self) -> int:
        return self.elements

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{dtype_name(self.dtype)}-n{self.elements}"

    @property
    def shape(self) -> str:
        return f"({self.elements // ROW}, {ROW}) stream float32, branch {dtype_name(self.dtype)}"

    def flops(self):
        return None

    def bytes_moved(self) -> int:
        """y, dy, dgrad (float32 here) and fy (branch dtype) read, x and dy_out written."""
        branch = torch.empty(0, dtype=self.dtype).element_size()
        return self.elements * (4 * 4 + branch + 4)

    def make_inputs(self, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        shape = (self.elements // ROW, ROW)
        y, fy, dy, dgrad = (torch.randn(shape, generator=g) for _ in range(4))
        return dict(y=y.to(device), fy=fy.to(device, self.dtype), dy=dy.to(device), dgrad=dgrad.to(device))


def coupling_cases(sizes: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str],
                   variants: Sequence[str]) -> list:
    return [CouplingCase("fwd", dtype, elements=max(ROW, n // ROW * ROW)) for dtype in dtypes for n in sorted(sizes)]


class Coupling(Implementation):
    def __init__(self, name: str):
        self.name = name
        self.peer = not name.startswith("longkernels")
        self.inplace = name in ("torch_add_", "longkernels-fused-inplace")
        self.note = {"torch": "fy.to(stream); y - fy; dy + dgrad", "torch_add_": "fy.to(stream); y - fy; dy.add_(dgrad)",
                     "longkernels-fused": "longkernels.reversible_coupling", 
                     "longkernels-fused-inplace": "longkernels.reversible_coupling(inplace=True)"}[name]

    def reasons(self, case, device):
        if self.peer:
            return []
        probe = torch.empty(1, device=device)
        backend = "triton" if device.type == "cuda" else "cpu"
        return not_supported_reasons(backend, probe)

    def build(self, case, device):
        own = {}  # the in-place ones accumulate into a private copy of dy, made at the first call

        def fn(y, fy, dy, dgrad):
            if self.inplace:
                dy = own.setdefault("dy", dy.clone())
            if self.peer:
                x = y - fy.to(y.dtype)
                return x, (dy.add_(dgrad) if self.inplace else dy + dgrad)
            return reversible_coupling(y, fy, dy, dgrad, inplace=self.inplace)
        return fn


OPERATION = Operation(
    name="reversible_coupling",
    make_cases=coupling_cases,
    implementations=(Coupling("longkernels-fused"), Coupling("longkernels-fused-inplace"), Coupling("torch"),
                     Coupling("torch_add_")),
    variants=("float32-stream",),
    modes=("fwd",),
    sweeps={"quick": Sweep((1 << 20,)), "default": Sweep((1 << 20, 1 << 23)),
            "full": Sweep((1 << 18, 1 << 20, 1 << 23, 1 << 25))},
    flops_note="no FLOPs counted: bytes moved (inputs read once, outputs written once) per second",
)
