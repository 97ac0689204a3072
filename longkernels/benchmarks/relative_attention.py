"""Transformer-XL relative positions: the fused kernels against the unfused formulation, and rotary beside.

Cases (variant ``txl``): ``N`` queries over ``M = N`` memory keys and their own ``N`` (causal), ``B = 1, H = 8,
D = 64``, relative embeddings for every distance (``P = M + N``); variant ``decode``: one query over a cache of
``M`` the sweep's size (forward only). Implementations:

* ``longkernels-relative``: ``memory_attention(..., pos_emb=R, content_bias=u, pos_bias=v)``, the position
  term per tile from the band of distances the tile covers;
* ``txl-unfused`` (the peer): what Transformer-XL implementations do: the content scores ``(q + u) K^T`` and
  the position scores ``(q + v) R^T`` as two products over the whole ``N x (M + N)`` grid, the second aligned
  by the pad-and-reshape shift, the causal mask, softmax and ``P V``, all materialised;
* ``longkernels-rotary`` (not a peer; another position scheme): plain memory attention at the same shape,
  the time the fused relative kernels are held to (within 1.5x).

Peak memory is reported by the engine for each; the summary gives the fused/unfused speedups, the
fused/rotary time ratios and the issue's targets at N = M = 4096.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

import torch

from ..ops.memory_attention import memory_attention, relative_order, relative_reasons
from .base import FWDBWD_FACTOR, Implementation, Operation, Sweep, dtype_name
from .memory_attention import visible_pairs

H, D = 8, 64


@dataclasses.dataclass(frozen=True)
class RelativeCase:
    mode: str
    dtype: torch.dtype
    N: int
    variant: str = "txl"

    op: ClassVar[str] = "relative_attention"
    sweep_name: ClassVar[str] = "N = M (decode: N = 1 over M)"

    size: int = 0  # the sweep's value: N = M, or the decode's M

    @property
    def M(self) -> int:
        return self.size if self.variant == "decode" else self.N

    @property
    def sweep(self) -> int:
        return self.size or self.N

    @property
    def id(self) -> str:
        part = f"decode-m{self.M}" if self.variant == "decode" else f"n{self.N}"
        return f"{self.op}-{self.mode}-{dtype_name(self.dtype)}-{part}"

    @property
    def shape(self) -> str:
        return f"B1 H{H} N{self.N} M{self.M} D{D} P{self.M + self.N}"

    def flops(self) -> float:
        # content and position logits (2 D each) and P V (2 D) per visible pair and head
        f = visible_pairs(self.N, self.M, causal=True, window=None) * 6 * D * H
        return f * (FWDBWD_FACTOR if self.mode == "fwdbwd" else 1.0)

    def make_inputs(self, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        grad = self.mode == "fwdbwd"

        def rnd(*shape, s=1.0):
            return (torch.randn(*shape, generator=g) * s).to(device, self.dtype).requires_grad_(grad)
        return dict(q=rnd(1, H, self.N, D), k=rnd(1, H, self.N, D), v=rnd(1, H, self.N, D),
                    mem_k=rnd(1, H, self.M, D), mem_v=rnd(1, H, self.M, D), pos_emb=rnd(H, self.M + self.N, D, s=0.5),
                    content_bias=rnd(H, D, s=0.1), pos_bias=rnd(H, D, s=0.1))


def relative_cases(sizes: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str],
                   variants: Sequence[str]) -> list:
    cases = []
    for variant in variants:
        for mode in modes:
            if variant == "decode" and mode != "fwd":
                continue  # decoding is inference
            for dtype in dtypes:
                for n in sorted(sizes):
                    cases.append(RelativeCase(mode, dtype, 1, "decode", n) if variant == "decode"
                                 else RelativeCase(mode, dtype, n, variant, n))
    return cases


def txl_unfused(q, k, v, mem_k, mem_v, pos_emb, content_bias, pos_bias):
    """Transformer-XL's formulation, batch-first: two score products over the (N, M + N) grid, the shift
    by padding a zero column and reading the buffer one row longer, the mask, softmax, P V."""
    B, Hq, N, Dh = q.shape
    keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
    L = keys.shape[2]
    ac = torch.matmul(q + content_bias.view(1, Hq, 1, Dh), keys.transpose(-1, -2))
    # Position scores against distances L - 1 .. 0 (descending), then shifted so (i, j) meets (L - N) + i - j.
    r = pos_emb.flip(1)  # row t: distance L - 1 - t
    bd = torch.matmul(q + pos_bias.view(1, Hq, 1, Dh), r.transpose(-1, -2).unsqueeze(0))  # (B, H, N, L)
    bd = torch.cat([bd.new_zeros(B, Hq, N, 1), bd], dim=-1).view(B, Hq, L + 1, N)[:, :, 1:].reshape(B, Hq, N, L)
    s = (ac + bd) * Dh ** -0.5
    mask = torch.ones(N, L, dtype=torch.bool, device=q.device).triu(1 + L - N)
    p = torch.softmax(s.float().masked_fill(mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(p, vals)


class Relative(Implementation):
    def __init__(self, name: str):
        self.name = name
        self.peer = name == "txl-unfused"
        self.comparable = name != "longkernels-rotary"
        self.note = {"longkernels-relative": "memory_attention(pos_emb=, content_bias=, pos_bias=)",
                     "txl-unfused": "two einsums, pad-and-reshape shift, masked softmax (materialised)",
                     "longkernels-rotary": "memory_attention, no position term (the time to stay within 1.5x of)"}[name]

    def reasons(self, case, device):
        if self.name == "txl-unfused":
            need = 6 * H * case.N * (case.M + case.N) * 4  # score-sized float32 buffers alive at once
            free = _memory_limit(device)
            if free is not None and need > 0.8 * free:
                return [f"needs about {need / 2**30:.0f} GiB of score matrices; {free / 2**30:.0f} GiB available"]
        if self.name == "longkernels-relative":
            probe = torch.empty(1, 1, 1, 64, device=device, dtype=case.dtype)
            name = relative_order(device.type)[0]
            return relative_reasons(name, probe, probe)
        return []

    def build(self, case, device):
        if self.name == "txl-unfused":
            return txl_unfused
        if self.name == "longkernels-rotary":
            def rotary(q, k, v, mem_k, mem_v, pos_emb, content_bias, pos_bias):
                return memory_attention(q, k, v, mem_k, mem_v)
            return rotary

        def fused(q, k, v, mem_k, mem_v, pos_emb, content_bias, pos_bias):
            return memory_attention(q, k, v, mem_k, mem_v, pos_emb=pos_emb, content_bias=content_bias,
                                    pos_bias=pos_bias)
        return fused


def _memory_limit(device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def summarize(records: list, device) -> dict:
    ok = {(r["impl"], r["variant"], r["mode"], r["dtype"], r["sweep"]): r for r in records if r.get("status") == "ok"}
    out = {"fused_speedup_over_unfused": {}, "fused_time_over_rotary": {}, "fused_peak_over_rotary": {}}
    for (impl, variant, mode, dt, n), r in ok.items():
        if impl != "longkernels-relative":
            continue
        key = f"{mode} {dt} decode N=1 M={n}" if variant == "decode" else f"{mode} {dt} N=M={n}"
        if ("txl-unfused", variant, mode, dt, n) in ok:
            out["fused_speedup_over_unfused"][key] = ok["txl-unfused", variant, mode, dt, n]["median_ms"] / r["median_ms"]
        if ("longkernels-rotary", variant, mode, dt, n) in ok:
            rot = ok["longkernels-rotary", variant, mode, dt, n]
            out["fused_time_over_rotary"][key] = r["median_ms"] / rot["median_ms"]
            if r.get("peak_bytes") and rot.get("peak_bytes"):
                out["fused_peak_over_rotary"][key] = r["peak_bytes"] / rot["peak_bytes"]
    targets = {}
    for key, x in out["fused_speedup_over_unfused"].items():
        if "N=M=4096" in key:
            targets[f"fused >= 3x unfused ({key})"] = x >= 3.0
    for key, x in out["fused_time_over_rotary"].items():
        if "N=M=4096" in key:
            targets[f"fused within 1.5x of rotary ({key})"] = x <= 1.5
    out["targets"] = targets
    return out


OPERATION = Operation(
    name="relative_attention",
    make_cases=relative_cases,
    implementations=(Relative("longkernels-relative"), Relative("txl-unfused"), Relative("longkernels-rotary")),
    variants=("txl", "decode"),
    sweeps={"quick": Sweep((512,), dtypes=("float32",)), "default": Sweep((1024,)),
            "full": Sweep((512, 1024, 2048, 4096, 8192))},
    flops_note="relative attention: 6*D per visible query-key pair and head (content, position, P V), "
               "fwd+bwd = 3.5x fwd",
    summarize=summarize,
)
