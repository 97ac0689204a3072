"""The benchmark engine behind ``longkernels bench`` (docs/performance.md: how we measure).

    longkernels bench                         # the representative sweep of every operation (minutes)
    longkernels bench --quick                 # a smoke run (about a minute)
    longkernels bench --full                  # the whole sweep (an hour or more on a 2-core CPU)
    longkernels bench --ops memory_attention --sizes 4096 --variants causal --out results/

For every case of the selected operations it builds one set of fresh random inputs, builds every
implementation that can run them (printing why the others cannot), warms each up, then times them in
interleaved rounds (every implementation once per round, in rotating order, so that the drift of a shared
machine hits all of them alike) and reports the median. Then it measures memory, one extra call each:

* ``peak``: on GPU, ``torch.cuda.max_memory_allocated`` over one call after ``reset_peak_memory_stats``
  (inputs included). On CPU, the peak of the bytes allocated through torch's CPU allocator during one
  call, from the profiler's memory events (inputs excluded, outputs and intermediates included; scratch a
  kernel takes outside torch's allocator is not seen).
* ``saved`` (fwd+bwd only): bytes the forward saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over distinct storages, the inputs' and parameters' own
  storages excluded.

Before the cases it measures the machine's ceilings in the same run (float32 and bfloat16 matrix products,
memory bandwidth), and every rate is also reported as a fraction of its ceiling. Speed is useful FLOP/s
(each operation's count, ``Operation.flops_note``) or bytes moved per second, and the ratio to the best
peer: ``best peer time / this time`` (above 1: faster than every peer; peers are everything that is not a
longkernels backend, ``reference`` included). Results go to ``<out>/<op>_<device>[-<variants>][-<level>].json``
and ``.png``; ``--out`` defaults to ``./longkernels-bench``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .._machine import cpu_isa, cpu_model, slug
from .._progress import Progress, format_seconds
from ..testing import saved_tensor_bytes
from . import operations, report
from .base import LEVELS, select_cases

# Sanity check of every implementation's output against the reference's (relative norm): it flags a peer
# wired up wrongly, it is no parity test (tests/ does that).
AGREE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEFAULT_OUT = "longkernels-bench"


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------
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
    """The commit of the checkout the package runs from, when it runs from one (else None)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import longkernels
    from .. import _ext
    from ..triton_kernels.tuning import autotune_enabled

    return {
        "device": device_name(device), "device_type": device.type, "device_slug": device_slug(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "longkernels": longkernels.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "longkernels_ext": _ext.build_info(), "loadavg_start": _loadavg(),
        # on a GPU: autotuned Triton tiles, or the first config that fits (LONGKERNELS_TRITON_AUTOTUNE=0)
        "triton_autotune": autotune_enabled(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _matmul_rate(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> tuple[float, int]:
    """torch's best matrix-product rate in ``dtype`` (FLOP/s) and the size it was reached at: n^3 products
    up to 8192 (GPU) or 2048 (CPU), best of three, growing n while the next size's product should take
    under a second.
    Where torch has no fast kernel for the dtype (bfloat16 on a CPU without AVX-512 BF16 runs at about one
    GFLOP/s, so one 2048^3 product takes half a minute) the measurement stops at the size that shows it."""
    sizes = (8192,) if device.type == "cuda" else (256, 512, 1024, 2048)
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        slow = time.perf_counter() - t0 > 0.5
        t = _best_of(lambda: a @ b, device, 1 if slow else 3)
        if 2 * n ** 3 / t > best:
            best, best_n = 2 * n ** 3 / t, n
        del a, b
        if slow or 8 * t > 1.0:
            break
    return best, best_n


def measure_ceilings(device: torch.device) -> dict:
    """The machine's rates in this run: torch's float32 and bfloat16 matrix products (n^3, best of a few)
    and memory bandwidth (a large sum: bytes read per second on CPU; a device copy, read + write, on GPU)."""
    out, sizes = {}, {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        rate, n = _matmul_rate(device, dtype, g)
        out[f"matmul_{str(dtype)[6:]}_flop_per_s"] = rate
        sizes[str(dtype)[6:]] = n
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    x = torch.randn(numel, generator=g).to(device)
    if device.type == "cuda":
        y = torch.empty_like(x)
        t = _best_of(lambda: y.copy_(x), device, 5)
        out["memory_bytes_per_s"] = 2 * x.numel() * x.element_size() / t
        del y
    else:
        t = _best_of(lambda: x.sum(), device, 5)
        out["memory_bytes_per_s"] = x.numel() * x.element_size() / t
    shown = ", ".join(f"{k} {v}^3" for k, v in sizes.items())
    out["note"] = (f"matmul: the best of n^3 products through torch ({shown}), best of 3 (of 1 where one takes over 0.5 s); memory: "
                   + ("device-to-device copy of 1 GiB, bytes read + written" if device.type == "cuda"
                      else "sum of 256 MiB of float32, bytes read"))
    del x
    return out


# --------------------------------------------------------------------------------------------
# One (case, implementation): the step that is timed
# --------------------------------------------------------------------------------------------
def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


class Runner:
    """An implementation built for a case, with its inputs. ``step()`` is what gets timed: the forward,
    and for fwd+bwd also the backward of random output gradients (the inputs' grads cleared first)."""

    def __init__(self, case, impl, device: torch.device, *, inputs: Optional[dict] = None, seed: int = 0):
        self.case, self.impl, self.device, self.seed = case, impl, device, seed
        self.inputs = inputs if inputs is not None else case.make_inputs(device, seed)
        self.backward = case.mode == "fwdbwd"
        self.leaves = [t for t in self.inputs.values()
                       if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]
        self.fn = impl.build(case, device)
        self.grads = None
        self.inner = 1

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
    """Bytes the forward saves for backward: distinct storages, the inputs' and parameters' own excluded."""
    exclude = [t for t in runner.inputs.values() if isinstance(t, torch.Tensor)]
    module = getattr(runner.fn, "module", None)
    if module is not None:
        exclude += list(module.parameters())
    return saved_tensor_bytes(runner.fn, exclude=exclude, **runner.inputs)


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


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def case_record(case) -> dict:
    from .base import dtype_name
    rec = {"op": case.op, "case": case.id, "variant": case.variant, "mode": case.mode,
           "dtype": dtype_name(case.dtype), "shape": case.shape, "sweep": case.sweep, "sweep_name": case.sweep_name,
           "flops": case.flops()}
    moved = getattr(case, "bytes_moved", None)
    if moved is not None:
        rec["bytes"] = moved()
    kv = getattr(case, "kv_bytes", None)
    if kv is not None:
        rec["kv_bytes"] = kv()
    return rec


def case_cost(case) -> float:
    """A rough weight of one step of ``case``, for the progress estimate (not reported)."""
    moved = getattr(case, "bytes_moved", None)
    return float(case.flops() or (moved() * 20 if moved else 0) or 1e9) + 2e8  # plus a fixed per-call cost


class CaseRun:
    """Every implementation of one case, on one set of inputs: build and warm up, check agreement, time in
    interleaved rounds, measure memory, compute the ratios to the best peer."""

    def __init__(self, case, impls, device, args, progress: Progress, seed: int):
        self.case, self.impls, self.device, self.args, self.progress = case, impls, device, args, progress
        self.unit = case_cost(case)
        self.inputs = case.make_inputs(device, seed)
        self.seed = seed
        self.records, self.runners, self.outputs = {}, {}, {}

    def run(self) -> list[dict]:
        self.build()
        self.check_agreement()
        samples = self.time_rounds()
        self.measure(samples)
        self.runners.clear()
        del self.inputs
        _free(self.device)
        self.ratios()
        return list(self.records.values())

    def _units(self) -> int:
        return self.args.warmup + self.args.repeats + 1

    def build(self) -> None:
        for impl in self.impls:
            rec = {**case_record(self.case), "impl": impl.name, "peer": impl.peer, "note": impl.note}
            self.records[impl.name] = rec
            self.progress.describe(f"{self.case.id} {impl.name}")
            reasons = impl.reasons(self.case, self.device)
            if reasons:
                rec.update(status="skipped", reason="; ".join(reasons))
                self.progress.update(self._units() * self.unit)
                continue
            try:
                runner = Runner(self.case, impl, self.device, inputs=self.inputs, seed=self.seed)
                if getattr(runner.fn, "info", None):  # what the implementation chose for this case (a tile)
                    rec["info"] = dict(runner.fn.info)
                times = []
                for i in range(max(1, self.args.warmup)):
                    t0 = time.perf_counter()
                    out = runner.step()
                    sync(self.device)
                    times.append(time.perf_counter() - t0)
                    if i == 0:
                        self.outputs[impl.name] = _tensors(out)[0].detach()
                    del out
                    self.progress.update(self.unit)
                rec["first_call_s"] = times[0]  # includes compilation where there is one
                runner.inner = max(1, min(100, math.ceil(self.args.min_sample_ms / 1e3 / max(times[-1], 1e-7))))
                self.runners[impl.name] = runner
            except Exception as exc:  # a peer that cannot run this case is a skip, not a crash
                rec.update(status="failed", reason=_first_line(exc))
                self.progress.update(self._units() * self.unit)
                _free(self.device)

    def check_agreement(self) -> None:
        """Each output against the reference's (or the first implementation that ran). Implementations that
        compute another function on purpose (``comparable = False``) are not compared."""
        for impl in self.impls:
            if not getattr(impl, "comparable", True) and impl.name in self.outputs:
                del self.outputs[impl.name]
                self.records[impl.name]["agrees_with"] = None
        base = "reference" if "reference" in self.outputs else next(iter(self.outputs), None)
        by_name = {impl.name: impl for impl in self.impls}
        for name, out in self.outputs.items():
            err = _rel_err(out, self.outputs[base])
            # An implementation may widen the tolerance where it is known to round more (``agree_tol``).
            tol = {**AGREE_TOL, **getattr(by_name[name], "agree_tol", {})}.get(self.case.dtype, 1e-2)
            self.records[name].update(agrees_with=base, rel_err=err, agrees=err <= tol)
        self.outputs.clear()

    def time_rounds(self) -> dict:
        samples = {name: [] for name in self.runners}
        for r in range(self.args.repeats):
            names = list(self.runners)
            names = names[r % len(names):] + names[:r % len(names)] if names else names
            for name in names:
                self.progress.describe(f"{self.case.id} {name} round {r + 1}/{self.args.repeats}")
                try:
                    samples[name].append(time_step(self.runners[name], self.runners[name].inner))
                except Exception as exc:
                    self.records[name].update(status="failed", reason=_first_line(exc))
                    del self.runners[name]
                    self.progress.update((self.args.repeats - r + 1) * self.unit)
                    _free(self.device)
                    continue
                self.progress.update(self.unit)
        return samples

    def measure(self, samples: dict) -> None:
        for name, runner in self.runners.items():
            self.progress.describe(f"{self.case.id} {name} memory")
            rec = self.records[name]
            ms = statistics.median(samples[name])
            rec.update(status="ok", times_ms=samples[name], inner=runner.inner, median_ms=ms,
                       min_ms=min(samples[name]))
            if rec["flops"]:
                rec["flop_per_s"] = rec["flops"] / (ms / 1e3)
            if rec.get("bytes"):
                rec["bytes_per_s"] = rec["bytes"] / (ms / 1e3)
            try:
                rec.update(measure_memory(runner))
            except Exception as exc:
                rec["memory_error"] = _first_line(exc)
            self.progress.update(self.unit)

    def ratios(self) -> None:
        peers = [r for r in self.records.values() if r["peer"] and r.get("status") == "ok"]
        best = min(peers, key=lambda r: r["median_ms"]) if peers else None
        for rec in self.records.values():
            if best is not None and rec.get("status") == "ok":
                rec["best_peer"] = best["impl"]
                rec["ratio_to_best_peer"] = best["median_ms"] / rec["median_ms"]


def add_ceiling_fractions(records: list, ceilings: dict) -> None:
    """Each rate as a fraction of the ceiling measured in the same run (matrix product of the case's dtype;
    memory bandwidth for bytes moved)."""
    for rec in records:
        if rec.get("flop_per_s"):
            peak = ceilings.get(f"matmul_{rec['dtype']}_flop_per_s") or ceilings.get("matmul_float32_flop_per_s")
            if peak:
                rec["fraction_of_matmul"] = rec["flop_per_s"] / peak
        if rec.get("bytes_per_s") and ceilings.get("memory_bytes_per_s"):
            rec["fraction_of_bandwidth"] = rec["bytes_per_s"] / ceilings["memory_bytes_per_s"]
        if rec.get("kv_bytes") and rec.get("median_ms") and ceilings.get("memory_bytes_per_s"):
            # the keys and values a forward must read, over the time, over the bandwidth (what bounds decode)
            rec["kv_fraction_of_bandwidth"] = rec["kv_bytes"] / (rec["median_ms"] / 1e3) / ceilings["memory_bytes_per_s"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _csv(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def parse_args(argv=None):
    names = list(operations())
    p = argparse.ArgumentParser(prog="longkernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", action="store_true", help="small sizes, 3 rounds: a smoke run of about a minute")
    level.add_argument("--full", action="store_true", help="the whole sweep of every operation (long on a CPU)")
    p.add_argument("--ops", help=f"comma list of operations (default: all: {','.join(names)})")
    p.add_argument("--dtypes", help="comma list, e.g. float32,bfloat16 (default: the level's)")
    p.add_argument("--modes", help="comma list of fwd,fwdbwd (default: the operation's)")
    p.add_argument("--sizes", "--lengths", dest="sizes",
                   help="comma list of sizes of the sweep (sequence lengths; depths for reversible; elements "
                        "for reversible_coupling), e.g. 1024,4096")
    p.add_argument("--variants", help="comma list of case variants (memory_attention: causal,window,gqa,models; "
                   "lsh_attention: causal,op; reversible: mlp,lsh; hf_models: hf, Hugging Face models end to "
                   "end, run only when asked for)")
    p.add_argument("--impls", help="comma list of implementations to run (default: all)")
    p.add_argument("--repeats", type=int, help="timed rounds; the median is reported (default 5; 3 for "
                   "--quick and the default level)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--min-sample-ms", type=float, default=20.0,
                   help="steps shorter than this are repeated back to back within one sample (default 20)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0; case k uses seed + 1000 k)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the JSON and PNG results (default ./{DEFAULT_OUT}; the repository's "
                        "committed figures are in bench/results/, written only when named here)")
    p.add_argument("--no-plot", action="store_true", help="write JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    args.level = "quick" if args.quick else "full" if args.full else "default"
    if args.repeats is None:
        args.repeats = 5 if args.level == "full" else 3
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    return args


def make_plan(args, device) -> list:
    """[(operation, cases, implementations)] for the selection; ValueError on an unknown name."""
    ops = operations()
    wanted = _csv(args.variants)
    if _csv(args.ops):
        op_names = _csv(args.ops)
    elif wanted:  # every operation with one of the variants asked for, opt-in ones included
        op_names = [n for n, op in ops.items() if any(v in op.variants for v in wanted)]
        if not op_names:
            raise ValueError(f"no operation has the variants {wanted}; "
                             + "; ".join(f"{n}: {','.join(op.variants)}" for n, op in ops.items()))
    else:
        op_names = [n for n, op in ops.items() if not op.opt_in]
    unknown = [o for o in op_names if o not in ops]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; known: {list(ops)}")
    try:
        sizes = [int(x) for x in _csv(args.sizes)] if args.sizes else None
    except ValueError:
        raise ValueError(f"--sizes takes integers, got {args.sizes!r}") from None
    plan = []
    for name in op_names:
        op = ops[name]
        variants = [v for v in wanted if v in op.variants] if wanted and not _csv(args.ops) else wanted
        cases = select_cases(op, level=args.level, sizes=sizes, dtypes=_csv(args.dtypes), modes=_csv(args.modes),
                             variants=variants, device=device)
        impls = [i for i in op.implementations if not args.impls or i.name in _csv(args.impls)]
        if cases and impls:
            plan.append((op, cases, impls))
    return plan


def result_stem(op, args, device) -> str:
    """``<op>_<device>[-<variants>][-<level>]``: a run of some variants gets its own file, so that it does
    not replace a run of all of them."""
    chosen = [v for v in op.variants if v in (_csv(args.variants) or op.variants)]
    part = "" if len(chosen) == len(op.variants) else "-" + "+".join(chosen)
    level = "" if args.level == "default" else f"-{args.level}"
    return f"{op.name}_{device_slug(device)}{part}{level}"


def run_plan(plan, device, args, progress: Progress) -> tuple[list, int]:
    """Runs every case; returns ([(op, records)], status): status 1 when a longkernels backend failed or
    disagreed with the reference."""
    status, reported, results = 0, set(), []
    for op, cases, impls in plan:
        records = []
        for index, case in enumerate(cases):
            recs = CaseRun(case, impls, device, args, progress, seed=args.seed + 1000 * index).run()
            for r in recs:
                if r.get("status") in ("skipped", "failed") and (r["impl"], r["reason"]) not in reported:
                    reported.add((r["impl"], r["reason"]))
                    progress.write(f"{r['status']}: {r['impl']} [{r['case']}]: {r['reason']}")
                if not r["peer"] and (r.get("status") == "failed" or r.get("agrees") is False):
                    status = 1  # a longkernels backend that crashes or disagrees is an error
            records += recs
        results.append((op, records))
    return results, status


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    try:
        plan = make_plan(args, device)
    except (KeyError, ValueError) as exc:
        print(f"longkernels bench: {exc}", file=sys.stderr)
        return 2
    if not plan:
        print("longkernels bench: nothing selected", file=sys.stderr)
        return 2

    env = environment(device)
    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, {env['threads']} threads, "
          f"commit {env['git_commit'] or 'unknown'}; level {args.level}", flush=True)
    load = env["loadavg_start"]
    if device.type == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load[0]} on {os.cpu_count()} cores: other work is running, and CPU "
              "timings (OpenMP threads above all) will be noisy", file=sys.stderr, flush=True)
    ceilings = measure_ceilings(device)
    env["ceilings"] = ceilings
    print(report.format_ceilings(ceilings, device), flush=True)

    units = args.warmup + args.repeats + 1
    total = sum(len(impls) * units * case_cost(c) for _, cases, impls in plan for c in cases)
    n_cases = sum(len(cases) for _, cases, _ in plan)
    print(f"{n_cases} cases of {', '.join(op.name for op, _, _ in plan)}", flush=True)
    progress = Progress(total, label="bench", enabled=not args.no_progress)
    try:
        results, status = run_plan(plan, device, args, progress)
    finally:
        progress.close()
    env["loadavg_end"] = _loadavg()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for op, records in results:
        add_ceiling_fractions(records, ceilings)
        summary = op.summarize(records, device) if op.summarize else None
        files, plot_note = report.write(op, records, env, vars(args), summary, out_dir / result_stem(op, args, device),
                                        plot=not args.no_plot)
        print()
        print(report.format_table(records, device, op.flops_note))
        if summary:
            print(report.format_summary(summary))
        print("\n" + "\n".join(f"wrote {f}" for f in files) + (f"\n{plot_note}" if plot_note else ""))
    print(f"\nbenchmarks took {format_seconds(time.perf_counter() - progress.start)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
