"""The ``longkernels`` command: ``info``, ``check`` and ``bench``."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from ._machine import cpu_model


def _probe(device: str) -> torch.Tensor:
    return torch.empty(1, 1, 1, 64, device=device)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cmd_info(args) -> int:
    import longkernels
    from longkernels import _ext
    from longkernels.ops.memory_attention import BACKENDS, not_supported_reasons

    print(f"longkernels {longkernels.__version__}   python {platform.python_version()}   torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}   TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    except ImportError as exc:
        print(f"triton: not installed ({exc})")
    print(f"cpu: {cpu_model()}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: none" + (" (CPU build of torch)" if torch.version.cuda is None else " (no device visible)"))
    info = _ext.build_info()
    print("extension longkernels._C: " + (", ".join(f"{k}={v}" for k, v in info.items() if k != "extension")
                                          if info["extension"] else f"not available: {info['reason']}"))
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("longkernels::"))
    print("torch ops: " + (", ".join(ops) or "none"))
    print("\nbackends for memory_attention:")
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            if device == "cuda" and not torch.cuda.is_available():
                reasons = ["no CUDA device here"]
            else:
                reasons = not_supported_reasons(name, _probe(device), _probe(device))
            state = "ok" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"  {device:5s} {name:10s} {state}")
    _info_lsh()
    return 0


LSH_OPS = ("lsh_hash_sort", "lsh_attention_fwd", "lsh_attention_bwd",  # the C++ extension's
           "lsh_hash_sort_torch", "lsh_attention_fwd_triton", "lsh_attention_bwd_triton")  # Python-defined


def _info_lsh() -> None:
    from longkernels.ops.lsh_attention import BACKENDS, hash_sort_backend, not_supported_reasons

    print("\nbackends for lsh_attention:")
    for device in ("cpu", "cuda"):
        for name in BACKENDS:
            if device == "cuda" and not torch.cuda.is_available():
                reasons = ["no CUDA device here"]
            else:
                reasons = not_supported_reasons(name, _probe(device), _probe(device))
            state = "ok" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"  {device:5s} {name:10s} {state}")
    for device in _devices():
        print(f"  {device:5s} hash+sort  {hash_sort_backend(_probe(device))}")
    registered = set(torch._C._dispatch_get_all_op_names())
    print("  torch ops: " + ", ".join(f"{op} {'ok' if f'longkernels::{op}' in registered else 'missing'}"
                                      for op in LSH_OPS))


CHECK_OPS = ("memory_attention", "lsh_attention")


def _check_lsh(args, devices: list[str]) -> int:
    """LSH attention rows of the check table: out, lse, d qk, d v of each backend against the reference
    (``longkernels.testing.compare_lsh``: 1e-10 in float64, the low-precision rule otherwise)."""
    from longkernels.ops.lsh_attention import not_supported_reasons
    from longkernels.testing import LSHCase, compare_lsh

    cases = [
        LSHCase(B=1, H=2, L=64, D=16, chunk_size=16, n_hashes=2, n_buckets=8, causal=True),
        LSHCase(B=1, H=2, L=7, D=32, chunk_size=16, n_hashes=2, n_buckets=2, causal=True),  # L < chunk_size
        LSHCase(B=2, H=2, L=100, D=16, Dv=24, chunk_size=16, n_hashes=2, n_buckets=8, causal=True, padding=True),
        LSHCase(B=1, H=1, L=130, D=20, chunk_size=12, n_hashes=3, n_buckets=8, before=2, after=1, padding=True),
        LSHCase(B=2, H=2, L=100, D=16, chunk_size=16, n_hashes=1, n_buckets=8, causal=True, strided=True),
        LSHCase(B=1, H=2, L=512, D=64, chunk_size=32, n_hashes=2, n_buckets=32, causal=True),
    ]
    failures = 0
    for device in devices:
        for backend in ("cpu", "triton"):
            if args.backends and backend not in args.backends:
                continue
            reasons = not_supported_reasons(backend, _probe(device), _probe(device))
            if reasons:
                if args.verbose:
                    print(f"{backend:8s} {device:6s} skipped (lsh_attention): {'; '.join(reasons)}")
                continue
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
                    rows = compare_lsh(case, backend, dtype, device=device)
                    failures += _print_row(backend, device, dtype, "lsh " + case.describe(), rows)
    return failures


def _print_row(backend, device, dtype, description, rows) -> int:
    """One row of the check table; returns 1 on a mismatch."""
    worst = max(rows, key=lambda r: r[1] / r[2])
    ok = all(r[3] for r in rows)
    status = "ok" if ok else "MISMATCH " + ", ".join(f"{r[0]}={r[1]:.1e}" for r in rows if not r[3])
    print(f"{backend:8s} {device:6s} {str(dtype)[6:]:9s} {description:54s} "
          f"{worst[1]:8.1e} {worst[2]:8.1e}  {status}", flush=True)
    return 0 if ok else 1


def cmd_check(args) -> int:
    from longkernels.ops.memory_attention import not_supported_reasons
    from longkernels.testing import Case, compare

    ops = [s.strip() for s in args.ops.split(",") if s.strip()] if args.ops else list(CHECK_OPS)
    unknown = [o for o in ops if o not in CHECK_OPS]
    if unknown:
        print(f"unknown operations {unknown}; known: {list(CHECK_OPS)}", file=sys.stderr)
        return 2
    args.backends = [s.strip() for s in args.backends.split(",") if s.strip()] if args.backends else None

    cases = [
        Case(N=1, M=0),
        Case(N=37, M=53, D=80, Dv=48, H=4, Hkv=2),
        Case(N=45, M=21, D=64, window=9, alibi=True),
        Case(B=2, N=35, M=18, D=16, strided=True, causal=False),
        Case(N=300, M=700, D=64, H=2, Hkv=1),
    ]
    failures = 0
    header = f"{'backend':8s} {'device':6s} {'dtype':9s} {'case':54s} {'worst':>8s} {'allowed':>8s}  result"
    print(header)
    print("-" * len(header))
    for device in _devices() if "memory_attention" in ops else []:
        for backend in ("cpu", "triton", "cuda"):
            if args.backends and backend not in args.backends:
                continue
            reasons = not_supported_reasons(backend, _probe(device), _probe(device))
            if reasons:
                if args.verbose:
                    print(f"{backend:8s} {device:6s} skipped: {'; '.join(reasons)}")
                continue
            dtypes = [torch.float64, torch.float32, torch.bfloat16] if device == "cpu" else \
                [torch.float32, torch.bfloat16, torch.float16]
            for dtype in dtypes:
                for case in cases:
                    if backend == "triton" and device == "cpu" and case.N * (case.N + case.M) > 20000:
                        continue  # the interpreter is slow; the small cases cover its logic
                    rows = compare(case, backend, dtype, device=device)
                    failures += _print_row(backend, device, dtype, case.describe(), rows)
    if "lsh_attention" in ops:
        failures += _check_lsh(args, _devices())
    print(f"\n{'all backends match the reference' if not failures else f'{failures} mismatching runs'}")
    return 1 if failures else 0


def cmd_bench(args, rest) -> int:
    from longkernels.benchmarks import engine

    return engine.main(rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longkernels", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, compiled ops and which backends are usable (and why not)")
    p_check = sub.add_parser("check", help="every available backend against the reference; non-zero on mismatch")
    p_check.add_argument("-v", "--verbose", action="store_true", help="also list skipped backends and why")
    p_check.add_argument("--ops", help=f"comma list of operations to check (default: all: {','.join(CHECK_OPS)})")
    p_check.add_argument("--backends", help="comma list of backends to check (default: every available one)")
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
