"""Reversible stacks against depth: time (forward+backward) and activation memory (docs/performance.md).

    python -m bench.reversible_depth                       # MLP blocks, depths 2..48
    python -m bench.reversible_depth --block lsh --depths 2,8,32
    python -m bench.reversible_depth --quick               # a smoke run

Three implementations of the same blocks (the very same modules and weights), measured together:

* ``reversible``: ``longkernels.ReversibleSequence`` (activations recomputed from the outputs);
* ``plain``: ``ReversibleSequence(..., reversible=False)``, ordinary autograd (every activation saved);
* ``checkpoint``: the plain sequence with ``torch.utils.checkpoint`` around each block
  (``use_reentrant=True``: it saves each block's two input streams through ``save_for_backward``, so
  the saved-tensor hooks see exactly what it keeps; the non-reentrant variant keeps them out of sight).

Blocks (``--block``):

* ``mlp`` (default): F and G are pre-norm feed-forwards ``LayerNorm -> Linear(dim, hidden) -> GELU ->
  Dropout -> Linear(hidden, dim)``, dropout 0.1: attention-free, so the time is matrix products whose
  cost per block is known and the depth trend is not hidden by attention kernels; the dropout makes the
  RNG-state bookkeeping part of what is timed. Defaults dim 256, hidden 1024, batch 2, length 256
  (~1.6 GFLOP fwd+bwd per block; depth 48 takes about a second per step on 2 cores).
* ``lsh``: F = pre-norm ``longkernels.nn.LSHSelfAttention`` (4 heads, chunk 64, 2 hashes), G = pre-norm
  ``longkernels.nn.ChunkedFeedForward`` (4 chunks): Reformer's block.

Each step clears the parameters' gradients (``set_to_none``), runs the forward under a fixed seed and
the backward of a fixed random cotangent. Timing: warm-up, then rounds in which every implementation
runs once in rotating order (a shared machine's drift hits all alike), median per implementation.
Memory, one extra step each: ``saved_bytes``, bytes saved for backward (saved_tensors_hooks, distinct
storages, the input and the parameters excluded); ``peak_bytes``, the peak of bytes allocated by torch's
CPU allocator during one step (profiler memory events; the input excluded, the parameters' gradients,
``param_bytes`` in the record, included) or on GPU ``torch.cuda.max_memory_allocated``.

Also measured: the reconstruction drift of the deepest stack in bfloat16 compute with a float32 stream
(eval mode, ``ReversibleSequence.inverse``), with a float32 fixed-point stream, and with float64 and bfloat16
streams. Targets (issue, reported, not
asserted): saved bytes at the deepest <= 1.1x those at the shallowest; reversible time <= 1.4x plain
and <= checkpoint; bf16-in-float32 reconstruction error after 48 blocks <= 1e-3.

Results: ``bench/results/reversible_<device>[-<block>][-dropout<p>][-quick].json`` and ``.png`` (the
block kind and dropout named when not the defaults).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from longkernels.nn.feedforward import ChunkedFeedForward
from longkernels.nn.lsh_attention import LSHSelfAttention
from longkernels.reversible import ReversibleBlock, ReversibleSequence
from longkernels.testing import saved_tensor_bytes

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("reversible", "plain", "checkpoint")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


def make_blocks(kind: str, depth: int, dim: int, hidden: int, *, dropout: float = 0.1, heads: int = 4,
                chunk_size: int = 64, seed: int = 0) -> list[ReversibleBlock]:
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


def build(impl: str, blocks, stream_dtype=None) -> nn.Module:
    if impl == "reversible":
        return ReversibleSequence(blocks, stream_dtype=stream_dtype)
    if impl == "plain":
        return ReversibleSequence(blocks, reversible=False, stream_dtype=stream_dtype)
    if impl == "checkpoint":
        return CheckpointSequence(blocks)
    raise ValueError(f"unknown implementation {impl!r} ({', '.join(IMPLS)})")


class Step:
    """One training step of ``model`` on ``x``: gradients cleared, forward under a fixed seed, backward
    of a fixed cotangent."""

    def __init__(self, model: nn.Module, x: torch.Tensor, seed: int = 0):
        self.model, self.x, self.seed = model, x, seed
        g = torch.Generator().manual_seed(seed + 1)
        self.dy = torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)

    def __call__(self):
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None
        torch.manual_seed(self.seed)
        out = self.model(self.x)
        out.backward(self.dy)
        return out


def make_input(batch: int, length: int, dim: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes saved for backward by one forward: distinct storages, the input and parameters excluded."""
    torch.manual_seed(0)
    return saved_tensor_bytes(model, x, exclude=[*model.parameters(), x])


def peak_bytes(step: Step) -> int:
    device = step.x.device
    step.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        from bench.engine import sync
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from bench.engine import cpu_peak_bytes
    return cpu_peak_bytes(step)


def time_once(step: Step, inner: int) -> float:
    from bench.engine import sync
    device = step.x.device
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / inner


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
    x = make_input(batch, length, dim, stream_dtype or module_dtype, device).detach()
    with torch.no_grad():
        y1, y2 = seq(x, x)
        a, b = seq.inverse(y1, y2)
        err = (torch.cat([a, b]).double() - torch.cat([x, x]).double()).norm() / (2 ** 0.5 * x.double().norm())
    return err.item()


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def measure_depth(args, depth: int, device, dtype, log) -> list[dict]:
    blocks = make_blocks(args.block, depth, args.dim, args.hidden, dropout=args.dropout)
    for b in blocks:
        b.to(device=device, dtype=dtype)
    x = make_input(args.batch, args.seq, args.dim, dtype, device, seed=depth)
    param_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    steps = {impl: Step(build(impl, blocks), x) for impl in args.impls}
    records = {impl: {"impl": impl, "depth": depth, "block": args.block, "dtype": str(dtype).replace("torch.", ""),
                      "shape": [args.batch, args.seq, args.dim], "hidden": args.hidden, "param_bytes": param_bytes}
               for impl in steps}
    outs, inner = {}, {}
    for impl, step in steps.items():
        t = []
        for i in range(max(1, args.warmup)):
            t0 = time.perf_counter()
            out = step()
            t.append(time.perf_counter() - t0)
            if i == 0:
                outs[impl] = out.detach()
        inner[impl] = max(1, min(50, math.ceil(args.min_sample_ms / 1e3 / max(t[-1], 1e-7))))
    ref = outs.get("plain")
    for impl, out in outs.items():  # a sanity check of the wiring (tests/ hold the parity)
        if ref is not None:
            records[impl]["rel_err_vs_plain"] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    samples = {impl: [] for impl in steps}
    names = list(steps)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for impl in order:
            samples[impl].append(time_once(steps[impl], inner[impl]))
    for impl, step in steps.items():
        rec = records[impl]
        rec.update(times_ms=samples[impl], inner=inner[impl], median_ms=statistics.median(samples[impl]),
                   min_ms=min(samples[impl]))
        rec["saved_bytes"] = saved_bytes(step.model, x)
        rec["peak_bytes"] = peak_bytes(step)
        log(f"  depth {depth:3d} {impl:10s} {rec['median_ms']:9.1f} ms  saved {rec['saved_bytes'] / 2**20:8.2f} MiB"
            f"  peak {rec['peak_bytes'] / 2**20:8.2f} MiB")
    del steps, blocks
    gc.collect()
    return list(records.values())


def summarize(records: list[dict], recon: dict) -> dict:
    by = {(r["impl"], r["depth"]): r for r in records}
    depths = sorted({r["depth"] for r in records})
    lo, hi = depths[0], depths[-1]
    out = {"depths": depths}
    if ("reversible", lo) in by:
        rev_lo, rev_hi = by["reversible", lo], by["reversible", hi]
        out["reversible_saved_ratio_deepest_vs_shallowest"] = rev_hi["saved_bytes"] / rev_lo["saved_bytes"]
        out["reversible_peak_ratio_deepest_vs_shallowest"] = rev_hi["peak_bytes"] / rev_lo["peak_bytes"]
    for other in ("plain", "checkpoint"):
        if ("reversible", lo) in by and (other, lo) in by:
            out[f"time_reversible_over_{other}"] = {d: by["reversible", d]["median_ms"] / by[other, d]["median_ms"]
                                                   for d in depths}
            out[f"saved_{other}_over_reversible_deepest"] = (by[other, hi]["saved_bytes"]
                                                             / by["reversible", hi]["saved_bytes"])
    out["reconstruction"] = recon
    targets = {}
    if "reversible_saved_ratio_deepest_vs_shallowest" in out:
        targets["saved bytes deepest <= 1.1x shallowest"] = out["reversible_saved_ratio_deepest_vs_shallowest"] <= 1.1
    if "time_reversible_over_plain" in out:
        targets["time <= 1.4x plain (deepest)"] = out["time_reversible_over_plain"][hi] <= 1.4
    if "time_reversible_over_checkpoint" in out:
        targets["time <= checkpoint (deepest)"] = out["time_reversible_over_checkpoint"][hi] <= 1.0
    if "bfloat16 blocks, float32 stream" in recon:
        err = recon["bfloat16 blocks, float32 stream"]["error"]
        targets["bf16 in float32 stream reconstruction <= 1e-3"] = err <= 1e-3
    if "bfloat16 blocks, float32 fixed-point stream" in recon:
        err = recon["bfloat16 blocks, float32 fixed-point stream"]["error"]
        targets["bf16 in float32 fixed-point stream reconstruction <= 1e-3"] = err <= 1e-3
    out["targets_met"] = targets
    return out


def plot(records: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    panels = [("median_ms", "fwd+bwd median time (ms)"), ("saved_bytes", "saved for backward (MiB)"),
              ("peak_bytes", "peak allocated in one step (MiB)")]
    for ax, (key, label) in zip(axes, panels):
        for impl in IMPLS:
            pts = sorted((r["depth"], r[key]) for r in records if r["impl"] == impl)
            if not pts:
                continue
            scale = 1 if key == "median_ms" else 2 ** -20
            ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", label=impl,
                    linewidth=2.2 if impl == "reversible" else 1.3, linestyle="-" if impl == "reversible" else "--")
        if key == "peak_bytes":  # what every implementation must hold anyway: the parameters' gradients
            pts = sorted({(r["depth"], r["param_bytes"]) for r in records})
            ax.plot([p[0] for p in pts], [p[1] * 2 ** -20 for p in pts], color="gray", linestyle=":",
                    label="parameter gradients (included)")
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        depths = summary["depths"]
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.reversible_depth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", default="mlp", choices=("mlp", "lsh"))
    p.add_argument("--depths", help="comma list (default 2,4,8,16,32,48; quick 2,8)")
    p.add_argument("--dim", type=int, help="model width (default 256; quick 64)")
    p.add_argument("--hidden", type=int, help="feed-forward width (default 4 x dim)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, help="sequence length (default 256; quick 64)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--impls", help=f"comma list of {','.join(IMPLS)} (default all)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-sample-ms", type=float, default=50.0)
    p.add_argument("--recon-depth", type=int, help="depth of the reconstruction measurement (default: deepest)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    default_depths = [2, 8] if args.quick else [2, 4, 8, 16, 32, 48]
    args.depths = [int(d) for d in args.depths.split(",")] if args.depths else default_depths
    args.dim = args.dim or (64 if args.quick else 256)
    args.hidden = args.hidden or 4 * args.dim
    args.seq = args.seq or (64 if args.quick else 256)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.impls = [s.strip() for s in args.impls.split(",")] if args.impls else list(IMPLS)
    bad = [i for i in args.impls if i not in IMPLS]
    if bad or not args.impls:
        p.error(f"--impls takes {', '.join(IMPLS)}, got {bad}")
    if min(args.depths) < 1:
        p.error("depths must be >= 1")
    return args


def main(argv=None) -> int:
    from bench.engine import device_slug, environment

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    env = environment(device)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, {env['threads']} threads, "
          f"load {env['loadavg_start']}", flush=True)
    print(f"blocks: {args.block}, dim {args.dim}, hidden {args.hidden}, batch {args.batch}, length {args.seq}, "
          f"{args.dtype}, dropout {args.dropout}", flush=True)
    records = []
    for depth in args.depths:
        records += measure_depth(args, depth, device, dtype, log)
    recon_depth = args.recon_depth or max(args.depths)
    recon = {}
    for name, (mdt, sdt, fixed) in {
            "bfloat16 blocks, float32 stream": (torch.bfloat16, torch.float32, False),
            "bfloat16 blocks, float32 fixed-point stream": (torch.bfloat16, torch.float32, True),
            "bfloat16 blocks, float64 stream": (torch.bfloat16, torch.float64, False),
            "bfloat16 blocks, bfloat16 stream": (torch.bfloat16, None, False),
            "float32": (torch.float32, None, False)}.items():
        err = reconstruction_error(args.block, recon_depth, args.dim, args.hidden, args.batch, args.seq, device,
                                   mdt, sdt, fixed)
        recon[name] = {"depth": recon_depth, "error": err}
    summary = summarize(records, recon)

    header = f"{'depth':>5}  " + "  ".join(f"{i + ' ms':>15}" for i in args.impls) + "  " + \
        "  ".join(f"{i + ' saved MiB':>21}" for i in args.impls) + "  " + \
        "  ".join(f"{i + ' peak MiB':>20}" for i in args.impls)
    print(header)
    by = {(r["impl"], r["depth"]): r for r in records}
    for d in args.depths:
        print(f"{d:>5}  " + "  ".join(f"{by[i, d]['median_ms']:>15.1f}" for i in args.impls) + "  " +
              "  ".join(f"{by[i, d]['saved_bytes'] / 2**20:>21.2f}" for i in args.impls) + "  " +
              "  ".join(f"{by[i, d]['peak_bytes'] / 2**20:>20.2f}" for i in args.impls))
    print("reconstruction relative error after %d blocks: " % recon_depth +
          ", ".join(f"{k} {v['error']:.1e}" for k, v in recon.items()))
    for k in ("time_reversible_over_plain", "time_reversible_over_checkpoint"):
        if k in summary:
            print(f"{k}: " + ", ".join(f"{d}: {v:.2f}" for d, v in summary[k].items()))
    if "reversible_saved_ratio_deepest_vs_shallowest" in summary:
        ratio = summary["reversible_saved_ratio_deepest_vs_shallowest"]
        print(f"reversible saved bytes, deepest / shallowest: {ratio:.3f}")
    for target, met in summary["targets_met"].items():
        print(f"target {'met' if met else 'NOT met'}: {target}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"reversible_{device_slug(device)}{'' if args.block == 'mlp' else '-' + args.block}"
            f"{'' if args.dropout == 0.1 else f'-dropout{args.dropout:g}'}{'-quick' if args.quick else ''}")
    doc = {"benchmark": "reversible_depth", **env, "loadavg_end": list(os.getloadavg()), "args": vars(args),
           "conventions": {
               "time": "median over rounds of one fwd+bwd step (grads set to None, forward, backward of a fixed "
                       "cotangent); every implementation once per round, rotating order",
               "saved_bytes": "saved_tensors_hooks over one forward, distinct storages, input and parameters excluded",
               "peak_bytes": ("torch.cuda.max_memory_allocated over one step minus what was allocated before"
                              if device.type == "cuda" else
                              "peak of bytes allocated by torch's CPU allocator during one step (profiler memory "
                              "events); includes the parameters' gradients (param_bytes), excludes the input"),
               "reconstruction": "||inverse(forward(x)) - (x, x)|| / ||(x, x)||, eval mode, both streams"},
           "summary": summary, "results": records}
    files = [out_dir / f"{stem}.json"]
    files[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if not args.no_plot:
        files.append(out_dir / f"{stem}.png")
        plot(records, summary, files[1], f"reversible vs plain vs checkpoint per block on {env['device']} "
             f"({env['threads']} threads): {args.block} blocks, dim {args.dim}, hidden {args.hidden}, "
             f"B{args.batch} L{args.seq}, {args.dtype}")
    print("\n".join(f"wrote {f}" for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
