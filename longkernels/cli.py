"""The ``longkernels`` command: ``info``, ``check`` and ``bench``.

    longkernels info     versions, the extension (and the torch it was built against), devices, compiled ops,
                         and for each operation and device which backend a call gets, and why not the others
    longkernels check    every available backend against the reference on random inputs (float64, float32,
                         bfloat16), a table; exits 1 on any mismatch
    longkernels bench    the benchmarks (``longkernels bench --help``)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from typing import Callable

import torch

from ._machine import cpu_isa, cpu_model


def _probe(device: str, dims: int = 4) -> torch.Tensor:
    return torch.empty((1,) * (dims - 1) + (64,), device=device)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclasses.dataclass(frozen=True)
class Op:
    """An operation as ``info`` and ``check`` see it: its backends, why each cannot take a probe input on a
    device, and the device's order of preference."""
    name: str
    backends: tuple
    reasons: Callable[[str, str], list]  # (backend, device) -> reasons
    order: Callable[[str], tuple]  # device -> backends in order of preference


def operations() -> list[Op]:
    from .ops import lsh_attention as lsh, memory_attention as ma, reversible_coupling as rc

    return [
        Op("memory_attention", ma.BACKENDS, lambda b, d: ma.not_supported_reasons(b, _probe(d), _probe(d)),
           ma.device_order),
        Op("lsh_attention", lsh.BACKENDS, lambda b, d: lsh.not_supported_reasons(b, _probe(d), _probe(d)),
           lsh.device_order),
        Op("reversible_coupling", rc.BACKENDS, lambda b, d: rc.not_supported_reasons(b, _probe(d, 1)),
           rc.device_order),
    ]


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def _print_versions() -> None:
    import longkernels
    from . import _ext

    print(f"longkernels {longkernels.__version__}   python {platform.python_version()}   torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}   TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
        from .triton_kernels.tuning import autotune_enabled, dot_precision
        print(f"  on CUDA tensors: tiles {'autotuned' if autotune_enabled() else 'first config that fits'} "
              f"(LONGKERNELS_TRITON_AUTOTUNE), float32 products {dot_precision(torch.float32)} "
              "(torch's float32 matmul precision: ieee, or tf32 where allowed)")
    except ImportError as exc:
        print(f"triton: not installed ({exc})")
    print(f"cpu: {cpu_model()} ({cpu_isa() or 'no AVX2/AVX-512'}), {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: none" + (" (CPU build of torch)" if torch.version.cuda is None else " (no device visible)"))
    info = _ext.build_info()
    print(f"extension longkernels._C: built against torch {info['torch_version_built'] or 'unknown (not built)'}, "
          f"running torch {info['torch_version_running']}")
    if info["extension"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in info.items()
                               if k not in ("extension", "torch_version_built", "torch_version_running")))
    else:
        print(f"  not available: {info['reason']}")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("longkernels::"))
    print("torch ops: " + (", ".join(o.removeprefix("longkernels::") for o in ops) or "none"))
    env = {k: v for k, v in os.environ.items() if k.startswith("LONGKERNELS_")}
    print("environment: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no LONGKERNELS_* switches"))


def _print_op(op: Op) -> None:
    from .ops import dispatch

    print(f"\n{op.name}:")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            print("  cuda   (no CUDA device here)")
            continue
        reasons = {name: op.reasons(name, device) for name in op.backends}
        for name in op.backends:
            state = "ok" if not reasons[name] else "unavailable: " + "; ".join(reasons[name])
            print(f"  {device:6s} {name:10s} {state}")
        order = op.order(device)
        pref = dispatch.preference()
        if pref in op.backends and not reasons[pref]:
            chosen = pref
        else:
            chosen = next((n for n in order if not reasons[n]), order[-1])
        line = f"  {device:6s} a call gets: {chosen}"
        if chosen != order[0] and chosen != pref:
            line += f" (FALLBACK from {order[0]}, slower: calls warn once)"
        pref = dispatch.preference_report(op.name, op.backends, lambda n: reasons[n])
        print(line + (f"; {pref}" if pref else ""))


def _print_hf() -> None:
    try:
        import transformers
    except ImportError:
        print("transformers: not installed (pip install longkernels[hf] for attn_implementation=\"longkernels\")")
        return
    print(f"transformers {transformers.__version__}: import longkernels.hf registers "
          f"attn_implementation=\"longkernels\" (and enable(model) for Reformer)")


def cmd_info(args) -> int:
    _print_versions()
    _print_hf()
    for op in operations():
        _print_op(op)
    from .ops import lsh_attention as lsh
    print("  lsh hash+sort: " + ", ".join(f"{d} {lsh.hash_sort_backend(_probe(d))}" for d in _devices()))
    from .ops import dispatch
    seen = dispatch.fallbacks()
    if seen:
        print("\nfallbacks in this process:")
        for (op, skipped, chosen, reason), n in seen.items():
            print(f"  {op}: {skipped} -> {chosen} ({n} calls): {reason}")
    return 0


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
CHECK_OPS = ("memory_attention", "lsh_attention")


def _memory_jobs(device, backend):
    from .testing import Case

    cases = [
        Case(N=1, M=0),
        Case(N=37, M=53, D=80, Dv=48, H=4, Hkv=2),
        Case(N=45, M=21, D=64, window=9, alibi=True),
        Case(B=2, N=35, M=18, D=16, strided=True, causal=False),
        Case(N=300, M=700, D=64, H=2, Hkv=1),
        Case(B=2, N=41, M=17, D=32, H=4, Hkv=2, padding="random", docs=3, softcap=8.0, sinks=True),
    ]
    dtypes = [torch.float64, torch.float32, torch.bfloat16] if device == "cpu" else \
        [torch.float32, torch.bfloat16, torch.float16]
    for dtype in dtypes:
        for case in cases:
            if backend == "triton" and device == "cpu" and case.N * (case.N + case.M) > 20000:
                continue  # the interpreter is slow; the small cases cover its logic
            yield case, dtype


def _lsh_jobs(device, backend):
    from .testing import LSHCase

    cases = [
        LSHCase(B=1, H=2, L=64, D=16, chunk_size=16, n_hashes=2, n_buckets=8, causal=True),
        LSHCase(B=1, H=2, L=7, D=32, chunk_size=16, n_hashes=2, n_buckets=2, causal=True),  # L < chunk_size
        LSHCase(B=2, H=2, L=100, D=16, Dv=24, chunk_size=16, n_hashes=2, n_buckets=8, causal=True, padding=True),
        LSHCase(B=1, H=1, L=130, D=20, chunk_size=12, n_hashes=3, n_buckets=8, before=2, after=1, padding=True),
        LSHCase(B=2, H=2, L=100, D=16, chunk_size=16, n_hashes=1, n_buckets=8, causal=True, strided=True),
        LSHCase(B=1, H=2, L=512, D=64, chunk_size=32, n_hashes=2, n_buckets=32, causal=True),
    ]
    if device == "cuda":
        dtypes = [torch.float32, torch.bfloat16]
    elif backend == "triton":  # the interpreter: the two precisions the rule distinguishes
        dtypes = [torch.float64, torch.float32]
    else:
        dtypes = [torch.float64, torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for case in cases:
            if backend == "triton" and device == "cpu" and case.B * case.H * case.L > 128:
                continue  # the interpreter is slow; the small cases cover its logic
            yield case, dtype


def _plan_check(ops: list[str], backends, devices, verbose: bool) -> list:
    """[(op, backend, device, case, dtype)] for every backend that can run here."""
    table = {op.name: op for op in operations()}
    jobs = []
    for name in ops:
        make = _memory_jobs if name == "memory_attention" else _lsh_jobs
        for device in devices:
            for backend in table[name].backends:
                if backend == "reference" or (backends and backend not in backends):
                    continue
                reasons = table[name].reasons(backend, device)
                if reasons:
                    if verbose:
                        print(f"{backend:8s} {device:6s} skipped ({name}): {'; '.join(reasons)}")
                    continue
                jobs += [(name, backend, device, case, dtype) for case, dtype in make(device, backend)]
    return jobs


def _print_row(backend, device, dtype, description, rows) -> int:
    """One row of the check table; returns 1 on a mismatch."""
    worst = max(rows, key=lambda r: r[1] / r[2])
    ok = all(r[3] for r in rows)
    status = "ok" if ok else "MISMATCH " + ", ".join(f"{r[0]}={r[1]:.1e}" for r in rows if not r[3])
    print(f"{backend:8s} {device:6s} {str(dtype)[6:]:9s} {description:54s} "
          f"{worst[1]:8.1e} {worst[2]:8.1e}  {status}", flush=True)
    return 0 if ok else 1


def cmd_check(args) -> int:
    from . import testing
    from ._progress import Progress

    ops = [s.strip() for s in args.ops.split(",") if s.strip()] if args.ops else list(CHECK_OPS)
    unknown = [o for o in ops if o not in CHECK_OPS]
    if unknown:
        print(f"unknown operations {unknown}; known: {list(CHECK_OPS)}", file=sys.stderr)
        return 2
    backends = [s.strip() for s in args.backends.split(",") if s.strip()] if args.backends else None
    devices = _devices() if args.device is None else [args.device]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    header = f"{'backend':8s} {'device':6s} {'dtype':9s} {'case':54s} {'worst':>8s} {'allowed':>8s}  result"
    print(header)
    print("-" * len(header))
    jobs = _plan_check(ops, backends, devices, args.verbose)
    progress = Progress(len(jobs), label="check", enabled=not args.no_progress)
    failures = 0
    for name, backend, device, case, dtype in jobs:
        progress.describe(f"{name} {backend} {device} {str(dtype)[6:]}")
        seed = testing.case_seed(case, str(dtype), backend)
        rows = testing.compare(case, backend, dtype, device=device, seed=seed)
        description = case.describe() if name == "memory_attention" else "lsh " + case.describe()
        progress.clear()  # a terminal shows the row where the progress line was, then the line again
        failures += _print_row(backend, device, dtype, description, rows)
        progress.update()
    progress.close()
    print(f"\n{'all backends match the reference' if not failures else f'{failures} mismatching runs'}")
    return 1 if failures else 0


def cmd_bench(args, rest) -> int:
    from .benchmarks import engine

    return engine.main(rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, compiled ops and which backend each call gets (and why)")
    p_check = sub.add_parser("check", help="every available backend against the reference; non-zero on mismatch")
    p_check.add_argument("-v", "--verbose", action="store_true", help="also list skipped backends and why")
    p_check.add_argument("--ops", help=f"comma list of operations to check (default: all: {','.join(CHECK_OPS)})")
    p_check.add_argument("--backends", help="comma list of backends to check (default: every available one)")
    p_check.add_argument("--device", choices=("cpu", "cuda"), help="only this device (default: every one here)")
    p_check.add_argument("--no-progress", action="store_true", help="no progress line")
    sub.add_parser("bench", help="benchmarks against the reference and peers (see `longkernels bench --help`)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not torch.cuda.is_available():
        # Triton's kernels can still be checked on this machine, under the interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return cmd_info(args) if args.cmd == "info" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
