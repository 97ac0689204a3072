"""Compiles every Triton kernel as a GPU would launch it, on a machine with no GPU.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' numerics on CPU tensors, but it runs the
kernels as Python: it never meets the GPU compiler, the tiles the autotuner tries on a GPU (the
interpreter's are fixed and small), the GPU-only branches (bfloat16 dot products without the
interpreter's float32 detour) or the shared-memory budget. This script drives the public operations on
CPU tensors with Triton's launch replaced by an ahead-of-time compile for a CUDA target (``sm_90`` by
default: H100/H200), every autotuning config of every launch, down to a cubin (ptxas included). Nothing
runs, so the outputs are never read.

    python tests/triton_compile.py [--arch 90] [--quick] [--json out.json]

It prints one line per compiled (kernel, options, config), with the shared memory, registers and stack
(spilled registers) of its cubin and the number of tensor-core instructions (``mma``/``wgmma``) in its PTX,
and exits non-zero when a kernel fails to compile, when a launch of the package leaves a compile option of
``triton_kernels.tuning.LAUNCH_OPTIONS`` to Triton's default, when an autotuned launch has no config within
the target's shared memory, or when a kernel with a fixed config exceeds it. (The autotuner discards a config
that is out of resources at run time, so one such config of several is reported, not failed.) ``--quick``
compiles fewer cases, each launch as ``LONGKERNELS_TRITON_AUTOTUNE=0`` makes it (the first config that fits,
through the launchers' own code for it): what the GPU tests of ``make gpu-check`` will compile.
``tests/test_triton_compile.py`` runs that; ``make triton-check`` runs every case with every config.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# The kernels must be decorated for the GPU (JITFunction), not for the interpreter; and autotuned, so that
# every config is compiled.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("LONGKERNELS_TRITON_AUTOTUNE", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Largest dynamic shared memory one block may use (the opt-in limit), in bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (local memory: spilled registers) of the cubin's kernel, from
    the cuobjdump that ships with Triton; {} if it is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(registers=int(found[1]), stack=int(found[2])) if found else {}


class Compiler:
    """Stands in for a GPU launch: compiles the kernel for ``arch`` with the arguments it was given."""

    def __init__(self, arch: int):
        self.arch = arch
        self.limit = SHARED_LIMIT[arch]
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.binders = {}
        self.results = {}  # (source hash, warps, stages) -> result
        self.launch = None  # the launch being compiled: its configs' result keys go here
        self.case = ""

    def compile(self, fn: JITFunction, args, kwargs) -> None:
        fp_fusion = kwargs.get("enable_fp_fusion")  # what the launch states (None: Triton's default)
        kwargs.setdefault("debug", False)
        if fn not in self.binders:
            self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, opts = self.binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, opts)
        src = ASTSource(fn, signature, constexprs, attrs)
        key = (src.hash(), options.num_warps, options.num_stages)
        if self.launch is not None:
            self.launch.append(key)
        if key in self.results:
            return
        consts = {fn.arg_names[path[0]]: str(value) for path, value in constexprs.items()
                  if not fn.arg_names[path[0]].startswith("stride")}
        res = dict(case=self.case, module=fn.module, kernel=fn.__name__, num_warps=options.num_warps, num_stages=options.num_stages,
                   constexprs=consts, fp_fusion=fp_fusion)
        start = time.perf_counter()
        try:
            kernel = triton.compile(src, target=self.target, options=options.__dict__)
            res.update(ok=True, shared=kernel.metadata.shared, fits=kernel.metadata.shared <= self.limit,
                       mma=len(re.findall(r"\b(?:wg)?mma\.", kernel.asm.get("ptx", ""))),
                       **resource_usage(kernel.asm["cubin"]))
        except Exception as exc:  # a compile error is the finding: keep it and go on
            res.update(ok=False, fits=False, error=f"{type(exc).__name__}: {str(exc)[-1500:]}")
        res["seconds"] = round(time.perf_counter() - start, 2)
        self.results[key] = res
        tiles = {k: consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_R", "BLOCK_C") if k in consts}
        status = ("ok" if res["fits"] else "OVER SHARED MEMORY") if res["ok"] else "COMPILE ERROR"
        usage = f"regs {res['registers']} stack {res['stack']} B  " if "registers" in res else ""
        usage += f"mma {res['mma']}  " if "mma" in res else ""
        print(f"  {fn.__name__:24s} warps {options.num_warps} stages {options.num_stages} {tiles} "
              f"shared {res.get('shared', '-')} B  {usage}{res['seconds']:.1f} s  {status}", flush=True)
        if not res["ok"]:
            print("    " + res["error"].replace("\n", "\n    "), flush=True)


def install(compiler: Compiler) -> list:
    """Routes every launch to ``compiler``; returns the autotuned launches (each a list of result keys). A
    direct launch of a kernel that does not fit raises ``OutOfResources``, as it would on the GPU (where the
    untuned launchers go on to the next config, and a fixed-config kernel fails)."""
    from triton.runtime.errors import OutOfResources

    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        if compiler.launch is not None:  # a config of an autotuned launch
            compiler.compile(self, args, kwargs)
            return
        compiler.launch = []
        try:
            compiler.compile(self, args, kwargs)
            res = compiler.results[compiler.launch[-1]]
        finally:
            compiler.launch = None
        if res["ok"] and not res["fits"]:
            raise OutOfResources(res["shared"], compiler.limit, "shared memory")

    def tuned_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        compiler.launch = []
        try:
            for config in configs:
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
        finally:
            launches.append(compiler.launch)
            compiler.launch = None

    JITFunction.run = run
    Autotuner.run = tuned_run
    return launches


def cases(quick: bool):
    """(name, thunk) pairs: each calls a public operation forward and backward on CPU tensors."""
    import longkernels as lk

    def rnd(*shape, dtype, grad=True):
        return torch.randn(*shape).to(dtype).requires_grad_(grad)

    def memory(dtype, *, B=1, H=4, Hkv=2, N=40, M=24, D=64, Dv=None, causal=True, window=None, alibi=False,
               pad=False, docs=False, softcap=None, sinks=False, backward=True):
        def thunk():
            q = rnd(B, H, N, D, dtype=dtype)
            k, v = rnd(B, Hkv, N, D, dtype=dtype), rnd(B, Hkv, N, Dv or D, dtype=dtype)
            mk, mv = rnd(B, Hkv, M, D, dtype=dtype), rnd(B, Hkv, M, Dv or D, dtype=dtype)
            kw = dict(causal=causal, window=window, softcap=softcap, backend="triton")
            if alibi:
                kw["alibi_slopes"] = torch.linspace(0.1, 1.0, H)
            if pad:
                kpm = torch.zeros(B, M + N, dtype=torch.bool)
                kpm[:, :3] = True
                kw["key_padding_mask"] = kpm
            if docs:
                kw["document_ids"] = (torch.arange(M + N) // 17).expand(B, -1).contiguous()
            if sinks:
                kw["sinks"] = torch.zeros(H, requires_grad=True)
            out = lk.memory_attention(q, k, v, mk, mv, **kw)
            if backward:
                out.sum().backward()
        return thunk

    def relative(dtype, *, H=4, Hkv=2, N=40, M=24, D=64, window=None):
        def thunk():
            q, k, v = rnd(1, H, N, D, dtype=dtype), rnd(1, Hkv, N, D, dtype=dtype), rnd(1, Hkv, N, D, dtype=dtype)
            mk, mv = rnd(1, Hkv, M, D, dtype=dtype), rnd(1, Hkv, M, D, dtype=dtype)
            pos = rnd(H, M + N, D, dtype=dtype)
            cb, pb = rnd(H, D, dtype=dtype), rnd(H, D, dtype=dtype)
            out = lk.memory_attention(q, k, v, mk, mv, window=window, pos_emb=pos, content_bias=cb, pos_bias=pb,
                                      backend="triton")
            out.sum().backward()
        return thunk

    def lsh(dtype, *, D=64, n_hashes=2, chunk_size=32, causal=True, pad=False):
        def thunk():
            L = 4 * chunk_size
            qk, v = rnd(1, 2, L, D, dtype=dtype), rnd(1, 2, L, D, dtype=dtype)
            kpm = None
            if pad:
                kpm = torch.zeros(1, L, dtype=torch.bool)
                kpm[:, -5:] = True
            out = lk.lsh_attention(qk, v, n_hashes=n_hashes, chunk_size=chunk_size, n_buckets=4, causal=causal,
                                   key_padding_mask=kpm, backend="triton")
            out.sum().backward()
        return thunk

    def coupling(dtype, grad_dtype):
        def thunk():
            y, fy, dy = (torch.randn(1000).to(dtype) for _ in range(3))
            lk.reversible_coupling(y, fy, dy, torch.randn(1000).to(grad_dtype), backend="triton")
        return thunk

    def tf32(thunk):  # float32 launches with TF32 allowed, as torch.set_float32_matmul_precision("high") allows it
        def run():
            matmul = torch.backends.cuda.matmul
            old = matmul.fp32_precision
            matmul.fp32_precision = "tf32"
            try:
                thunk()
            finally:
                matmul.fp32_precision = old
        return run

    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    full = not quick  # float32's IEEE dot products compile slowly (a minute a kernel): --quick compiles one
    yield "memory bf16 D64 GQA causal", memory(bf16)
    yield ("memory bf16 D128 GQA window ALiBi padding documents softcap sinks",
           memory(bf16, H=8, Hkv=2, D=128, window=30, alibi=True, pad=True, docs=True, softcap=20.0, sinks=True))
    yield "memory fp32 D80 Dv48 full (not causal)", memory(f32, H=2, Hkv=2, D=80, Dv=48, causal=False, backward=full)
    yield "decode bf16 D128 1 query GQA 4, every mask", memory(bf16, H=8, Hkv=2, N=1, M=300, D=128, window=200,
                                                               alibi=True, pad=True, softcap=30.0, sinks=True,
                                                               backward=full)
    yield "decode fp32 D64 16 queries", memory(f32, H=2, Hkv=2, N=16, M=300, backward=full)
    yield "memory fp32 D64 TF32 GQA causal", tf32(memory(f32))
    yield "relative bf16 D64 GQA window", relative(bf16, window=30)
    yield "lsh bf16 D64 causal padding 2 rounds", lsh(bf16, pad=True)
    yield "coupling fp32 stream, bf16 gradient", coupling(f32, bf16)
    if full:
        yield "memory fp16 D256 causal", memory(f16, H=2, Hkv=1, D=256)
        yield "memory fp32 D256 causal", memory(f32, H=2, Hkv=2, D=256)
        yield "memory fp32 D128 window", memory(f32, H=4, Hkv=4, D=128, window=20)
        yield "decode fp16 D256 2 queries GQA 8", memory(f16, H=8, Hkv=1, N=2, M=300, D=256)
        yield "relative fp32 D128", relative(f32, D=128)
        yield "lsh fp32 D128 1 round, chunk 64", lsh(f32, D=128, n_hashes=1, chunk_size=64, causal=False)
        yield "coupling fp32", coupling(f32, f32)

def self_check(arch: int) -> int:
    """Shows that the check fails where it should: a kernel that does not compile for the GPU (a 4-wide
    dot product, which the GPU's matrix instructions cannot take) and one whose tiles need more shared
    memory than a block may have are both reported."""
    import triton.language as tl

    def tiny_dot(X, Y):
        o = tl.arange(0, 4)
        a = tl.load(X + o[:, None] * 4 + o[None, :])
        tl.store(Y + o[:, None] * 4 + o[None, :], tl.dot(a, a))

    def big_tiles(X, Y, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        r, c = tl.arange(0, BLOCK), tl.arange(0, WIDE)
        a = tl.load(X + r[:, None] * WIDE + c[None, :])
        b = tl.load(X + c[:, None] * BLOCK + r[None, :])
        tl.store(Y + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))

    compiler = Compiler(arch)
    x, y = torch.zeros(1 << 16), torch.zeros(1 << 18, dtype=torch.bfloat16)
    compiler.compile(JITFunction(tiny_dot), (x, x), {})
    compiler.compile(JITFunction(big_tiles), (y, y), dict(BLOCK=256, WIDE=512, num_warps=8))
    tiny, big = compiler.results.values()
    caught = not tiny["ok"] and big["ok"] and not big["fits"]
    print("self-check:", "both faults reported" if caught else "a fault went unreported", flush=True)
    return 0 if caught else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT), help="CUDA compute capability")
    ap.add_argument("--quick", action="store_true", help="fewer cases, untuned launches (the first config)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--self-check", action="store_true", help="only show that faulty kernels are reported")
    args = ap.parse_args(argv)
    if args.self_check:
        return self_check(args.arch)

    compiler = Compiler(args.arch)
    launches = install(compiler)
    if args.quick:  # the launchers take their untuned path (triton_kernels/tuning.py)
        os.environ["LONGKERNELS_TRITON_AUTOTUNE"] = "0"
    # Import the kernels as GPU kernels; then let the dispatcher accept CPU tensors for them (it reads the
    # variable per call). Nothing is launched: every launch above is a compile.
    import longkernels.triton_kernels.lsh_attention  # noqa: F401
    import longkernels.triton_kernels.memory_attention as tma
    import longkernels.triton_kernels.relative_attention  # noqa: F401
    import longkernels.triton_kernels.reversible_coupling  # noqa: F401
    assert not tma._INTERPRET
    tma._splits = lambda B, HKV, keys, device: max(1, min(8, triton.cdiv(keys, 256)))  # needs a GPU's SM count
    os.environ["TRITON_INTERPRET"] = "1"

    print(f"triton {triton.__version__}: compiling for sm_{args.arch} (shared memory per block "
          f"{compiler.limit} B)", flush=True)
    start = time.perf_counter()
    errors = []
    torch.manual_seed(0)
    for name, thunk in cases(args.quick):
        print(f"{name}:", flush=True)
        compiler.case = name
        try:
            thunk()
        except Exception as exc:  # the driver itself failed: report it as a failure of the case
            errors.append(f"{name}: the operation raised {type(exc).__name__}: {exc}")
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)

    results = compiler.results
    for key, res in results.items():
        if not res["ok"]:
            errors.append(f"{res['case']}: {res['kernel']} (warps {res['num_warps']}, stages {res['num_stages']}, "
                          f"{res['constexprs']}) does not compile: {res['error'][:300]}")
        if res["module"].startswith("longkernels.") and res["fp_fusion"] is not True:
            errors.append(f"{res['case']}: {res['kernel']} is launched without enable_fp_fusion=True "
                          "(triton_kernels/tuning.py LAUNCH_OPTIONS)")
    for keys in launches:  # (a direct launch that does not fit raised above)
        if keys and not any(results[k]["fits"] for k in keys):
            first = results[keys[0]]
            errors.append(f"{first['case']}: no config of {first['kernel']} fits in shared memory")
    over = sum(1 for r in results.values() if r["ok"] and not r["fits"])
    spills = sum(1 for r in results.values() if r.get("stack"))
    print(f"{len(results)} compiles in {time.perf_counter() - start:.0f} s; {over} configs over the shared memory "
          f"(the autotuner skips those); {spills} spill registers to the stack (slow, not wrong); "
          f"{len(errors)} failures", flush=True)
    for e in errors:
        print("FAIL " + e, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, results=list(results.values()),
                           errors=errors), f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
