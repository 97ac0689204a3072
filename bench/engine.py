"""The benchmark engine behind ``longkernels bench`` (docs/performance.md: how to measure).

    PYTHONPATH=. python -m bench.engine --quick
    python -m longkernels bench --lengths 4096 --variants causal

For every case of the selected operations (``bench/cases.py``) it builds one set of fresh random inputs,
builds every implementation that can run them (printing why the others cannot), warms each up, then
times them in interleaved rounds (every implementation once per round, in rotating order, so that the
drift of a shared machine hits all of them alike) and reports the median. Then it measures memory, one
extra call each:

* ``peak``: on GPU, ``torch.cuda.max_memory_allocated`` over one call after ``reset_peak_memory_stats``
  (inputs included). On CPU, the peak of the bytes allocated through torch's CPU allocator during one
  call, from the profiler's memory events (inputs excluded, outputs and intermediates included; scratch a
  kernel takes outside torch's allocator is not seen).
* ``saved`` (fwd+bwd only): bytes the forward saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over distinct storages, the inputs' own storages excluded.

Speed is useful FLOP/s (each operation's count, ``Operation.flops_note`` in bench/cases.py; attention:
visible pairs only, fwd+bwd = 3.5x fwd) and the ratio to the best peer:
``best peer time / this time`` (above 1: faster than every peer; peers are everything that is not a
longkernels backend, ``reference`` included). Results go to ``<out>/<op>_<device>.json`` and ``.png``
(``<op>_<device>-<variants>.json`` for a run of some of the operation's variants).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench import cases as cases_mod

ROOT = Path(__file__).resolve().parent.parent
# Sanity check of every implementation's output against the reference's (relative norm): it flags a peer
# wired up wrongly, it is no parity test (tests/ does that).
AGREE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------
from longkernels._machine import cpu_isa, cpu_model  # noqa: E402  (one definition, shared with the CLI)
from longkernels.testing import saved_tensor_bytes  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(device_name(device))
    isa = cpu_isa()  # one CPU model name covers parts with and without AVX-512 (AMD EPYC)
    return "cpu-" + slug(cpu_model()) + (f"-{isa}" if isa else "")


def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from longkernels import _ext

    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "longkernels_ext": _ext.build_info(), "loadavg_start": _loadavg(),
    }


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# One (case, implementation): the step that is timed
# --------------------------------------------------------------------------------------------
def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """An implementation built for a case, with its inputs. ``step()`` is what gets timed: the forward,
    and for fwd+bwd also the backward of random output gradients (the inputs' grads cleared first)."""

    def __init__(self, case, impl, device: torch.device, *, inputs: Optional[dict] = None, seed: int = 0):
        self.case, self.impl, self.device, self.seed = case, impl, device, seed
        self.inputs = inputs if inputs is not None else case.make_inputs(device, seed)
        self.backward = case.mode == "fwdbwd"
        self.leaves = [t for t in self.inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        self.fn = impl.build(case, device)
        self.grads = None

    def _output_grads(self, outs):
        g = torch.Generator().manual_seed(self.seed + 1)
        return [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None
        zero_grad = getattr(self.fn, "zero_grad", None)  # implementations holding parameters (modules)
        if zero_grad is not None:
            zero_grad()

    def step(self):
        self.clear_grads()
        out = self.fn(**self.inputs)
        if self.backward:
            outs = [o for o in _tensors(out) if o.requires_grad]
            if self.grads is None:
                self.grads = self._output_grads(outs)
            torch.autograd.backward(outs, self.grads)
        return out


def time_step(runner: Runner, inner: int) -> float:
    """Milliseconds per step, averaged over ``inner`` back-to-back steps."""
    device = runner.device
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            runner.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        runner.step()
    return (time.perf_counter() - t0) * 1e3 / inner


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints profiler start/stop lines straight to fd 2; keep them out of the report."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn) -> int:
    """Peak of live bytes allocated by torch's CPU allocator while ``fn`` runs (what was allocated
    before it, the inputs, is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(runner: Runner) -> int:
    """Bytes the forward saves for backward: distinct storages, the inputs' own excluded."""
    inputs = [t for t in runner.inputs.values() if isinstance(t, torch.Tensor)]
    return saved_tensor_bytes(runner.fn, exclude=inputs, **runner.inputs)


def measure_memory(runner: Runner) -> dict:
    device = runner.device
    result = {}
    runner.clear_grads()  # the previous call's gradients must not be freed inside the measurement
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        sync(device)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_bytes"] = cpu_peak_bytes(runner.step)
    if runner.backward:
        result["saved_bytes"] = saved_bytes(runner)
    return result


# --------------------------------------------------------------------------------------------
# A case: every implementation, measured together
# --------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        return float("inf")
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="step", mininterval=0.5, dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def case_record(case) -> dict:
    return {"op": case.op, "case": case.id, "variant": case.variant, "mode": case.mode,
            "dtype": cases_mod.dtype_name(case.dtype), "shape": case.shape, "sweep": case.sweep,
            "flops": case.flops()}


def run_case(case, impls, device, args, progress: Progress, seed: int) -> list[dict]:
    units = 2 + args.repeats  # build and warm-up, the rounds, memory
    inputs = case.make_inputs(device, seed)
    records, runners, outputs = {}, {}, {}
    for impl in impls:
        rec = {**case_record(case), "impl": impl.name, "peer": impl.peer, "note": impl.note}
        records[impl.name] = rec
        progress.describe(f"{case.id} {impl.name}")
        reasons = impl.reasons(case, device)
        if reasons:
            rec.update(status="skipped", reason="; ".join(reasons))
            progress.update(units)
            continue
        try:
            runner = Runner(case, impl, device, inputs=inputs, seed=seed)
            if getattr(runner.fn, "info", None):  # what the implementation chose for this case (e.g. a tile)
                rec["info"] = dict(runner.fn.info)
            times = []
            for i in range(max(1, args.warmup)):
                t0 = time.perf_counter()
                out = runner.step()
                sync(device)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    outputs[impl.name] = _tensors(out)[0].detach()
                del out
            rec["first_call_s"] = times[0]  # includes compilation where there is one
            runner.inner = max(1, min(100, math.ceil(args.min_sample_ms / 1e3 / max(times[-1], 1e-7))))
            runners[impl.name] = runner
        except Exception as exc:  # a peer that cannot run this case is a skip, not a crash
            rec.update(status="failed", reason=_first_line(exc))
            progress.update(units)
            _free(device)
            continue
        progress.update(1)

    # Agreement with the reference output (or the first implementation that ran). Implementations that
    # compute another function on purpose (``comparable = False``) are not compared.
    for impl in impls:
        if not getattr(impl, "comparable", True) and impl.name in outputs:
            del outputs[impl.name]
            records[impl.name]["agrees_with"] = None
    base_name = "reference" if "reference" in outputs else next(iter(outputs), None)
    by_name = {impl.name: impl for impl in impls}
    for name, out in outputs.items():
        err = _rel_err(out, outputs[base_name])
        # An implementation may widen the tolerance where it is known to round more (``agree_tol``).
        tol = {**AGREE_TOL, **getattr(by_name[name], "agree_tol", {})}.get(case.dtype, 1e-2)
        records[name].update(agrees_with=base_name, rel_err=err, agrees=err <= tol)
    outputs.clear()

    samples = {name: [] for name in runners}
    for r in range(args.repeats):
        names = list(runners)
        names = names[r % len(names):] + names[:r % len(names)] if names else names
        for name in names:
            progress.describe(f"{case.id} {name} round {r + 1}/{args.repeats}")
            try:
                samples[name].append(time_step(runners[name], runners[name].inner))
            except Exception as exc:
                records[name].update(status="failed", reason=_first_line(exc))
                del runners[name]
                progress.update(args.repeats - r + 1)
                _free(device)
                continue
            progress.update(1)

    for name, runner in runners.items():
        progress.describe(f"{case.id} {name} memory")
        rec = records[name]
        ms = statistics.median(samples[name])
        rec.update(status="ok", times_ms=samples[name], inner=runner.inner, median_ms=ms,
                   min_ms=min(samples[name]))
        if rec["flops"]:
            rec["flop_per_s"] = rec["flops"] / (ms / 1e3)
        try:
            rec.update(measure_memory(runner))
        except Exception as exc:
            rec["memory_error"] = _first_line(exc)
        progress.update(1)
    runners.clear()
    del inputs
    _free(device)

    peers = [r for r in records.values() if r["peer"] and r.get("status") == "ok"]
    best = min(peers, key=lambda r: r["median_ms"]) if peers else None
    for rec in records.values():
        if best is not None and rec.get("status") == "ok":
            rec["best_peer"] = best["impl"]
            rec["ratio_to_best_peer"] = best["median_ms"] / rec["median_ms"]
    return list(records.values())


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(records: list[dict], device: torch.device, flops_note: Optional[str] = None) -> str:
    gpu = device.type == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    header = ["operation", "mode", "shape", "dtype", "implementation", "median ms", unit, "peak MiB",
              "saved MiB", "vs best peer"]
    rows, previous = [], None
    for r in records:
        if r.get("status") != "ok":
            continue
        key = r["case"]
        if previous is not None and key != previous:
            rows.append(None)
        previous = key
        ratio = r.get("ratio_to_best_peer")
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x" + ("*" if r["impl"] == r.get("best_peer") else "")
        if r.get("agrees") is False:
            ratio_s += f" MISMATCH {r['rel_err']:.1e}"
        rows.append([r["op"], r["mode"], r["shape"], r["dtype"], r["impl"], f"{r['median_ms']:.2f}",
                     f"{r['flop_per_s'] / scale:.1f}" if r.get("flop_per_s") else "-",
                     _mib(r.get("peak_bytes")), _mib(r.get("saved_bytes")), ratio_s])
    widths = [max([len(h)] + [len(row[i]) for row in rows if row]) for i, h in enumerate(header)]
    right = {5, 6, 7, 8}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += ["" if row is None else fmt(row) for row in rows]

    skipped: dict = {}
    for r in records:
        if r.get("status") in ("skipped", "failed"):
            skipped.setdefault((r["impl"], r["status"], r["reason"]), []).append(r["case"])
    if skipped:
        lines += ["", "not measured:"]
        for (impl, status, reason), ids in skipped.items():
            lines.append(f"  {impl} ({status}, {len(ids)} case{'s' if len(ids) > 1 else ''}): {reason}")
    lines += ["", f"{unit}: useful FLOPs ({flops_note or 'visible pairs; fwd+bwd = 3.5x fwd'}) / median time.",
              "vs best peer: best peer's time / this time (* = the best peer).",
              "peak MiB: " + ("torch.cuda.max_memory_allocated over one call (inputs included)." if gpu else
                              "peak bytes allocated by torch's CPU allocator during one call (inputs excluded)."),
              "saved MiB: bytes saved for backward (saved_tensors_hooks), inputs excluded."]
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str, sweep_name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r.get("status") == "ok"]
    panels = sorted({(r["mode"], r["dtype"]) for r in ok})
    if not panels:
        return
    # Curves for the variants measured at several sizes; single-size variants are in the table.
    sizes = {}
    for r in ok:
        sizes.setdefault(r["variant"], set()).add(r["sweep"])
    curved = {v for v, s in sizes.items() if len(s) > 1} or set(sizes)
    names = sorted({r["impl"] for r in ok})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}  # one colour per implementation
    styles = ["o", "s", "^", "D", "v"]
    markers = {v: styles[i % len(styles)] for i, v in enumerate(sorted(curved))}
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax, (mode, dtype) in zip(axes.flat, panels):
        series = {}
        for r in ok:
            if r["mode"] == mode and r["dtype"] == dtype and r["variant"] in curved:
                series.setdefault((r["impl"], r["variant"], r["peer"]), []).append((r["sweep"], r["median_ms"]))
        for (impl, variant, peer), pts in sorted(series.items()):
            pts.sort()
            label = impl if len(curved) == 1 else f"{impl} [{variant}]"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[variant], color=colors[impl],
                    linestyle="--" if peer else "-", linewidth=1.2 if peer else 2.2, label=label)
        xs = sorted({r["sweep"] for r in ok})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel(sweep_name)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{mode}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _csv(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="longkernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and 3 rounds: a smoke run")
    p.add_argument("--ops", help=f"comma list of operations (default: all: {','.join(cases_mod.OPERATIONS)})")
    p.add_argument("--dtypes", help="comma list, e.g. float32,bfloat16 (default: the operation's)")
    p.add_argument("--modes", help="comma list of fwd,fwdbwd (default: both)")
    p.add_argument("--lengths", help="comma list of sizes of the sweep (sequence lengths), e.g. 1024,4096")
    p.add_argument("--variants", help="comma list of case variants (memory_attention: causal,window,gqa; "
                   "lsh_attention: causal)")
    p.add_argument("--impls", help="comma list of implementations to run (default: all)")
    p.add_argument("--repeats", type=int, help="timed rounds; the median is reported (default 5, quick 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="steps shorter than this are repeated back to back within one sample (default 20)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder (default bench/results)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    op_names = _csv(args.ops) or list(cases_mod.OPERATIONS)
    unknown = [o for o in op_names if o not in cases_mod.OPERATIONS]
    if unknown:
        print(f"unknown operations {unknown}; known: {list(cases_mod.OPERATIONS)}", file=sys.stderr)
        return 2
    try:
        sweep = [int(x) for x in _csv(args.lengths)] if args.lengths else None
    except ValueError:
        print(f"--lengths takes integers, got {args.lengths!r}", file=sys.stderr)
        return 2

    plan = []
    for name in op_names:
        op = cases_mod.OPERATIONS[name]
        try:
            selected = cases_mod.select_cases(op, quick=args.quick, sweep=sweep, dtypes=_csv(args.dtypes),
                                              modes=_csv(args.modes), variants=_csv(args.variants), device=device)
        except (KeyError, ValueError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 2
        impls = [i for i in op.implementations if not args.impls or i.name in _csv(args.impls)]
        plan.append((op, selected, impls))

    env = environment(device)
    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, {env['threads']} threads, "
          f"commit {env['git_commit'] or 'unknown'}", flush=True)
    load = env["loadavg_start"]
    if device.type == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load[0]} on {os.cpu_count()} cores: other work is running, and CPU "
              "timings (OpenMP threads above all) will be noisy", file=sys.stderr, flush=True)
    conventions = {
        "flops": "useful FLOPs of the visible work (docs/performance.md)",
        "time": "median over rounds; each round times every implementation once, in rotating order",
        "peak_bytes": ("torch.cuda.max_memory_allocated over one call after reset_peak_memory_stats (inputs "
                       "included)" if device.type == "cuda" else
                       "peak bytes allocated by torch's CPU allocator during one call (profiler memory events; "
                       "inputs excluded)"),
        "saved_bytes": "bytes saved for backward (saved_tensors_hooks, distinct storages, inputs excluded); "
                       "fwd+bwd only",
        "ratio_to_best_peer": "best peer median / this median (> 1: faster than every peer)",
    }
    total = sum(len(sel) * len(impls) * (2 + args.repeats) for _, sel, impls in plan)
    progress = Progress(total, enabled=not args.no_progress)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    status, reported, reports = 0, set(), []
    try:
        for op, selected, impls in plan:
            records = []
            for index, case in enumerate(selected):
                recs = run_case(case, impls, device, args, progress, seed=args.seed + 1000 * index)
                for r in recs:
                    if r.get("status") in ("skipped", "failed") and (r["impl"], r["reason"]) not in reported:
                        reported.add((r["impl"], r["reason"]))
                        progress.write(f"{r['status']}: {r['impl']} [{r['case']}]: {r['reason']}")
                    if not r["peer"] and (r.get("status") == "failed" or r.get("agrees") is False):
                        status = 1  # a longkernels backend that crashes or disagrees is an error
                records += recs
            sweep_name = selected[0].sweep_name if selected else "size"
            # A run of some of the variants gets its own file, so that it does not replace a full sweep's.
            chosen = [v for v in op.variants if v in (_csv(args.variants) or op.variants)]
            part = "" if len(chosen) == len(op.variants) else "-" + "+".join(chosen)
            stem = f"{op.name}_{device_slug(device)}{part}{'-quick' if args.quick else ''}"
            files = [out_dir / f"{stem}.json"]
            doc = {"operation": op.name, **env, "loadavg_end": _loadavg(), "args": vars(args), "sweep_name": sweep_name,
                   "conventions": {**conventions, "flops": f"{conventions['flops']}; {op.name}: {op.flops_note}"},
                   "results": records}
            files[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
            if not args.no_plot and records:
                files.append(out_dir / f"{stem}.png")
                plot(records, files[1], f"{op.name} on {env['device']} ({env['threads']} threads, "
                     f"torch {env['torch']})", sweep_name)
            reports.append((op, records, files))
    finally:
        progress.close()
    for op, records, files in reports:
        print()
        print(format_table(records, device, op.flops_note))
        print("\n" + "\n".join(f"wrote {f}" for f in files))
    return status


if __name__ == "__main__":
    sys.exit(main())
