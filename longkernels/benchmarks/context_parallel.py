"""Context-parallel benchmark: ring attention over a gloo group of this machine's processes (one thread each).

For each shape and mode (forward, forward+backward) it measures, in one run:

* ``single``: one process running :func:`longkernels.memory_attention` over the whole sequence (the same total
  work, one thread), the time the ring is compared with (ideal ring time: ``single / W``);
* ``ring``: :func:`longkernels.distributed.ring_attention`'s step (messages in flight while blocks compute);
* ``compute`` and ``comm``: the same step with its messages left out (received buffers stand in), and with
  its messages only (no block computed): overlap is ``ring / max(compute, comm)`` (1.0: perfect);
* ``concurrent``: every rank running ``single`` at once: this machine's ceiling for W processes computing
  together (cores that share execution units, memory bandwidth or a power budget do not give W times one
  core's speed): the ring's ideal time here is ``concurrent / W``, and ``of_ceiling`` is that over ``ring``;
* bytes sent per step (every rank together, from the plan), and the full ring's for comparison.

Each time is the slowest rank's, the median of ``--reps`` steps after a warm-up, every rank starting together.

    python -m longkernels.benchmarks.context_parallel                  # W = 2, the default shapes
    python -m longkernels.benchmarks.context_parallel --world 1        # the ring's own overhead at W = 1
    python -m longkernels.benchmarks.context_parallel --out bench/results/context_parallel_mybox.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

SHAPES = [  # (name, T, H, Hkv, D, window)
    ("causal 4k", 4096, 8, 2, 64, None),
    ("causal 8k", 8192, 8, 2, 64, None),
    ("window 512, 16k", 16384, 8, 2, 64, 512),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn, reps, group, sync, device):
    import torch.distributed as dist

    fn()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier(group)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(float(t))
    return statistics.median(times)


def _rank(rank, world, port, args, out_path):
    import torch.distributed as dist
    import longkernels
    from longkernels import distributed as cp
    from longkernels.ops.memory_attention import lse_dtype

    torch.set_num_threads(1)
    dev = torch.device(args.device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    g = dist.group.WORLD
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    shapes = [s for s in SHAPES if not args.lengths or s[1] in args.lengths]
    shapes += [(f"causal {T}", T, 4, 2, 32, None) for T in args.lengths if T not in {s[1] for s in SHAPES}]
    try:
        for name, T, H, Hkv, D, window in shapes:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                gen = torch.Generator().manual_seed(0)
                q, k, v, dout = (torch.randn(1, h, T, D, generator=gen).to(dev, dtype) for h in (H, Hkv, Hkv, H))
                ql, kl, vl, dol = (cp.shard_sequence(t, 2) for t in (q, k, v, dout))
                lay = cp.zigzag_layout(T, world)
                plan = cp._plan(lay, True, window or 0)
                fwd, bwd = cp._block_ops(ql, vl)
                base = cp._RingConfig(g, world, rank, plan, True, window or 0, D ** -0.5)

                def ring_fwd(measure):
                    cfg = cp._RingConfig(**{**base.__dict__, "measure": measure})
                    return lambda: cp._ring_forward(cfg, ql, kl, vl, None, None, None, fwd)

                out, lse = cp._ring_forward(base, ql, kl, vl, None, None, None, fwd)

                def ring_fwdbwd(measure):
                    cfg = cp._RingConfig(**{**base.__dict__, "measure": measure})

                    def step():
                        o, l_ = cp._ring_forward(cfg, ql, kl, vl, None, None, None, fwd)
                        cp._ring_backward(cfg, dol, ql, kl, vl, None, None, out, lse, None, None, bwd)
                    return step

                def single(mode, everyone=False):
                    qq, kk, vv = (t.detach().requires_grad_(mode == "fwdbwd") for t in (q, k, v))

                    def step():
                        if rank != 0 and not everyone:
                            return
                        o = longkernels.memory_attention(qq, kk, vv, window=window)
                        if mode == "fwdbwd":
                            o.backward(dout)
                            for t in (qq, kk, vv):
                                t.grad = None
                    return step

                elem = torch.finfo(dtype).bits // 8
                kv_bytes = cp.bytes_sent(T, world, heads_kv=Hkv, head_dim=D, element_size=elem, window=window)
                for mode, make in (("fwd", ring_fwd), ("fwdbwd", ring_fwdbwd)):
                    t = {"single": _timed(single(mode), args.reps, g, sync, dev),
                         "concurrent": _timed(single(mode, True), args.reps, g, sync, dev)}
                    for measure, key in (("both", "ring"), ("compute", "compute"), ("comm", "comm")):
                        t[key] = _timed(make(measure), args.reps, g, sync, dev)
                    # Backward: the key blocks again, and their dK/dV (float32) back to their owners.
                    grad_bytes = kv_bytes["bytes"] // elem * torch.finfo(lse_dtype(dtype)).bits // 8
                    sent = kv_bytes["bytes"] * (1 if mode == "fwd" else 2) + (0 if mode == "fwd" else grad_bytes)
                    rows.append({"shape": name, "T": T, "H": H, "Hkv": Hkv, "D": D, "window": window,
                                 "dtype": dtype_name, "mode": mode, "world": world, **t,
                                 "speedup": t["single"] / t["ring"], "efficiency": t["single"] / t["ring"] / world,
                                 "of_ceiling": t["concurrent"] / world / t["ring"],
                                 "overlap": t["ring"] / max(t["compute"], t["comm"], 1e-12),
                                 "bytes_sent": sent, "forward_bytes": kv_bytes["bytes"],
                                 "full_ring_forward_bytes": kv_bytes["full_ring_bytes"], "rounds": kv_bytes["rounds"]})
                    if rank == 0 and not args.no_progress:
                        r = rows[-1]
                        print(f"  {name:16s} {dtype_name:8s} {mode:6s} single {r['single'] * 1e3:8.1f} ms  ring "
                              f"{r['ring'] * 1e3:8.1f} ms (compute {r['compute'] * 1e3:7.1f}, comm "
                              f"{r['comm'] * 1e3:6.1f})  speedup {r['speedup']:.2f}x ({r['of_ceiling']:.2f} of the machine's)  "
                              f"overlap {r['overlap']:.2f}  "
                              f"{r['bytes_sent'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes in the group (default 2: one per core here)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    p.add_argument("--lengths", default="", help="only these sequence lengths (comma-separated; default all); a length "
                                                 "not among the default shapes runs causal H4/2 D32 (a smoke run)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per measurement (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--out", default=None, help="JSON path (default longkernels-bench/context_parallel_<machine>.json)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    from longkernels._machine import cpu_model, slug
    import longkernels
    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model()
    out = args.out or os.path.join("longkernels-bench", f"context_parallel_{slug(machine)}-w{args.world}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        print(f"context parallel: {args.world} processes ({'NCCL' if args.device == 'cuda' else 'gloo'}, one "
              f"thread each) on {machine}", file=sys.stderr, flush=True)
        mp.spawn(_rank, args=(args.world, _free_port(), args, path), nprocs=args.world, join=True)
        rows = json.load(open(path))
    meta = {"machine": machine, "torch": torch.__version__, "longkernels": longkernels.__version__,
            "world": args.world, "device": args.device, "reps": args.reps}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
