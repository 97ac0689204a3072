"""Train a small byte-level LongContextLM on this machine, with nothing to download.

Two tasks:

* ``text``: next-byte prediction on the Python standard library's own source files (several MB of
  real text on every machine with Python), trained segment by segment with Transformer-XL memory;
  reports held-out bits per byte.
* ``recall``: generated key/value sequences. A *pair* token binds a key to a value (each key has one
  value per sequence); a *query* token for a key is followed by its value. Queries are either *local*
  (the key's pair occurs earlier in the same segment) or *remote* (the pair occurs only in earlier
  segments, beyond the current one). Memory must carry remote answers: the same model run without
  memory cannot beat chance on them (1 / n_values).

Each configuration trains in its own process (so its peak resident memory is its own), with the
same seed and data: by default memory attention, reversible and plain, with and without memory.
Prints a table and writes JSON (and a PNG of the loss curves when matplotlib is installed).

    python examples/train_lm.py --quick                 # a smaller model and fewer steps: under 3 minutes
    python examples/train_lm.py                         # both tasks, the default configurations
    python examples/train_lm.py --task recall --steps 300 --configs rev-mem,rev-nomem
    python examples/train_lm.py --task text --steps 200 --out results/train_lm_mybox.json
    python examples/train_lm.py --task text --positions relative      # Transformer-XL's relative positions
    # Compressive memory: 64 cached vectors per layer as 32 memory + 32 compressed (rate 4: a 160-token
    # horizon) against 64 of plain memory, on a recall task whose answers lie up to 7 segments back:
    python examples/train_lm.py --task recall --configs rev-mem --segments 8 --seg-len 32 --mem-len 32 \
        --cmem-len 32 --compression-rate 4
    python examples/train_lm.py --task recall --configs rev-mem --segments 8 --seg-len 32 --mem-len 64

Context parallelism (each segment sharded over N processes, ring attention, Ulysses with relative positions;
gloo on the CPU), optionally
with data parallelism on the other axis of a 2-D device mesh when WORLD_SIZE is a multiple of N; the
per-step losses match one process's (``--context-parallel 1``) to float32 round-off:

    torchrun --nproc-per-node 2 examples/train_lm.py --context-parallel 2 --steps 20
    torchrun --nproc-per-node 4 examples/train_lm.py --context-parallel 2 --steps 20   # 2 data x 2 context
    python examples/train_lm.py --context-parallel 1 --steps 20                         # the same, one process
    torchrun --nproc-per-node 2 examples/train_lm.py --context-parallel 2 --positions relative   # Ulysses

Results go to ./longkernels-bench/train_lm_<machine>.json (and .png) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import longkernels
from longkernels._progress import Progress, format_seconds
from longkernels.nn import LongContextLM

CONFIGS = {  # name: (reversible, use memory)
    "rev-mem": (True, True),
    "plain-mem": (False, True),
    "rev-nomem": (True, False),
}

# Recall task vocabulary (bytes): fillers a-z, queries, answers '0'.., pair tokens 16 * key + value + 128.
FILLER = (97, 123)
QUERY0, ANSWER0, PAIR0 = 64, 48, 128


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def stdlib_text(max_bytes: int) -> bytes:
    """The standard library's .py files (site-packages excluded), in sorted order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(parts)[:max_bytes]


class TextData:
    def __init__(self, max_bytes: int, length: int):
        data = torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8).long()
        cut = int(len(data) * 0.95)
        self.train, self.val, self.length = data[:cut], data[cut:], length
        if len(self.val) <= length + 1:
            raise SystemExit(f"not enough standard-library text for sequences of {length} bytes")

    def batch(self, batch: int, gen: torch.Generator, split: str = "train"):
        src = self.train if split == "train" else self.val
        starts = torch.randint(0, len(src) - self.length - 1, (batch,), generator=gen)
        seq = torch.stack([src[s:s + self.length + 1] for s in starts.tolist()])
        x, y = seq[:, :-1], seq[:, 1:]
        return x, y, torch.ones_like(y, dtype=torch.bool), None


class RecallData:
    """Sequences of ``segments`` segments of ``seg_len`` bytes: fillers, pair tokens (key, value) and
    ``query, answer`` couples. Weights mark the answers; ``remote`` marks answers whose pair occurs
    only in earlier segments."""

    def __init__(self, seg_len: int, segments: int, n_keys: int = 8, n_values: int = 8, pairs_per_segment: int = 3,
                 queries_per_segment: int = 6):
        if n_keys * 16 > 128 or n_values > 16:
            raise SystemExit("recall: at most 8 keys and 16 values fit the byte vocabulary")
        self.seg_len, self.segments = seg_len, segments
        self.n_keys, self.n_values = n_keys, n_values
        self.pairs, self.queries = pairs_per_segment, queries_per_segment
        if 2 * (self.pairs + self.queries) + 2 > seg_len:
            raise SystemExit(f"recall: segments of {seg_len} bytes are too short for the pairs and queries")

    def one(self, gen: torch.Generator):
        S, T = self.seg_len, self.seg_len * self.segments
        seq = torch.randint(*FILLER, (T + 1,), generator=gen)
        weight = torch.zeros(T + 1, dtype=torch.bool)
        remote = torch.zeros(T + 1, dtype=torch.bool)
        values = torch.randint(0, self.n_values, (self.n_keys,), generator=gen)
        seen_at: dict[int, int] = {}  # key -> segment of its first pair token
        for s in range(self.segments):
            # Slots of two positions; pairs first in the segment's first half, queries after them.
            slots = torch.randperm(S // 2 - 1, generator=gen)[: self.pairs + self.queries].sort().values
            pos = [s * S + 2 * int(i) + 1 for i in slots]
            keys = torch.randint(0, self.n_keys, (self.pairs,), generator=gen).tolist()
            for p, k in zip(pos[: self.pairs], keys):
                seq[p] = PAIR0 + 16 * k + int(values[k])
                seen_at.setdefault(k, s)
            known = sorted(seen_at)
            for p in pos[self.pairs:]:
                if not known:
                    break
                k = known[int(torch.randint(0, len(known), (1,), generator=gen))]
                local = any(int(seq[q]) - PAIR0 == 16 * k + int(values[k]) for q in range(s * S, p))
                seq[p], seq[p + 1] = QUERY0 + k, ANSWER0 + int(values[k])
                weight[p + 1] = True
                remote[p + 1] = not local
        # Targets are the next tokens: position t predicts seq[t + 1].
        return seq[:-1], seq[1:], weight[1:], remote[1:]

    def batch(self, batch: int, gen: torch.Generator, split: str = "train"):
        items = [self.one(gen) for _ in range(batch)]
        return tuple(torch.stack(t) for t in zip(*items))


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------
def build(args, reversible: bool) -> LongContextLM:
    torch.manual_seed(args.seed)
    extra = {}
    if args.cmem_len:
        extra = dict(cmem_len=args.cmem_len, compression_rate=args.compression_rate, compression=args.compression)
    return LongContextLM(256, args.dim, args.depth, args.heads, attention="memory", reversible=reversible,
                         mem_len=args.mem_len, ff_chunks=args.ff_chunks, dropout=args.dropout,
                         positions=args.positions, **extra)


def run_sequence(model, x, y, weight, use_memory: bool, seg_len: int, opt=None, clip: float = 1.0):
    """Runs the segments in order (memory carried when ``use_memory``); with ``opt``, one optimiser
    step per segment (Transformer-XL's truncated backpropagation). Per-position losses and predictions."""
    mems, losses, preds = None, [], []
    for s in range(0, x.shape[1], seg_len):
        xs, ys, ws = x[:, s:s + seg_len], y[:, s:s + seg_len], weight[:, s:s + seg_len]
        out = model(xs, mems if use_memory else None)
        nll = F.cross_entropy(out.logits.float().transpose(1, 2), ys, reduction="none")
        if opt is not None and ws.any():
            loss = (nll * ws).sum() / ws.sum()
            rec = model.reconstruction_loss(out.mems) if use_memory else None  # compressive memory's own loss
            if rec is not None:
                loss = loss + rec
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        mems = out.mems
        losses.append(nll.detach())
        preds.append(out.logits.detach().argmax(-1))
    return torch.cat(losses, dim=1), torch.cat(preds, dim=1)


def evaluate(model, data, args, use_memory: bool) -> dict:
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    model.eval()
    nll_sum = count = 0.0
    right = {"local": 0, "remote": 0}
    total = {"local": 0, "remote": 0}
    with torch.no_grad():
        for _ in range(args.eval_batches):
            x, y, w, remote = data.batch(args.batch, gen, "val")
            nll, pred = run_sequence(model, x, y, w, use_memory, args.seg_len)
            nll_sum += float((nll * w).sum())
            count += float(w.sum())
            if remote is not None:
                ok = pred == y
                for name, sel in (("remote", w & remote), ("local", w & ~remote)):
                    right[name] += int((ok & sel).sum())
                    total[name] += int(sel.sum())
    model.train()
    res = {"loss": nll_sum / max(count, 1)}
    res["bits_per_byte"] = res["loss"] / math.log(2)
    for name in right:
        if total[name]:
            res[f"{name}_recall"] = right[name] / total[name]
    return res


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    reversible, use_memory = CONFIGS[args.config]
    data = (TextData(args.text_mb << 20, args.seg_len * args.segments) if args.task == "text"
            else RecallData(args.seg_len, args.segments))
    model = build(args, reversible)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    gen = torch.Generator().manual_seed(args.seed)
    history, tokens, train_time = [], 0, 0.0
    progress = Progress(args.steps, label=f"{args.task} {args.config}", enabled=not args.no_progress, interval=10)
    for step in range(args.steps):
        x, y, w, _ = data.batch(args.batch, gen)
        t0 = time.perf_counter()
        nll, _ = run_sequence(model, x, y, w, use_memory, args.seg_len, opt)
        train_time += time.perf_counter() - t0
        sched.step()
        tokens += x.numel()
        loss = float((nll * w).sum() / w.sum())
        progress.describe(f"step {step + 1}/{args.steps} loss {loss:.3f} {tokens / train_time:.0f} tokens/s")
        progress.update()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "train_loss": loss, **evaluate(model, data, args, use_memory)})
    progress.close()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"task": args.task, "config": args.config, "reversible": reversible, "memory": use_memory,
            "positions": args.positions, "mem_len": args.mem_len, "cmem_len": args.cmem_len,
            "compression_rate": args.compression_rate if args.cmem_len else None,
            "tokens_per_s": tokens / train_time, "train_seconds": train_time, "peak_rss_bytes": peak_rss,
            "parameters": sum(p.numel() for p in model.parameters()), "final": history[-1], "history": history}


# --------------------------------------------------------------------------------------------
# Context parallelism (torchrun)
# --------------------------------------------------------------------------------------------
def context_parallel(args) -> dict:
    """Trains the text task with every segment sharded over ``args.context_parallel`` processes (ring
    attention) and the batch split over the mesh's other axis; returns the per-step losses (of the whole
    batch: the same numbers one process gets)."""
    import torch.distributed as dist
    from longkernels import distributed as cp

    world, n_cp = int(os.environ.get("WORLD_SIZE", "1")), args.context_parallel
    if world % n_cp:
        raise SystemExit(f"--context-parallel {n_cp} must divide the number of processes ({world})")
    torch.set_num_threads(args.threads)
    group, dp_rank, n_dp = None, 0, world // n_cp
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (n_dp, n_cp), mesh_dim_names=("dp", "cp"))
        group = mesh.get_group("cp") if n_cp > 1 else None
        dp_rank = mesh.get_local_rank("dp")
    if args.batch % n_dp:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the data-parallel size {n_dp}")
    torch.manual_seed(args.seed)
    model = LongContextLM(256, args.dim, args.depth, args.heads, attention="memory", mem_len=args.mem_len,
                          ff_chunks=args.ff_chunks, context_parallel_group=group, positions=args.positions)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    data = TextData(args.text_mb << 20, args.seg_len * args.segments)
    gen = torch.Generator().manual_seed(args.seed)

    def world_sum(t):
        if world > 1:
            dist.all_reduce(t)
        return t

    losses, t_start = [], time.perf_counter()
    per = args.batch // n_dp
    for step in range(args.steps):
        x, y, w, _ = data.batch(args.batch, gen)  # the same global batch on every process
        x, y, w = (t[dp_rank * per:(dp_rank + 1) * per] for t in (x, y, w))
        mems, total, count = None, 0.0, 0.0
        for s in range(0, x.shape[1], args.seg_len):
            xs, ys, ws = (t[:, s:s + args.seg_len] for t in (x, y, w))
            if group is not None:
                xs, ys, ws = (cp.shard_sequence(t, 1, group) for t in (xs, ys, ws))
            out = model(xs, mems)
            nll = (F.cross_entropy(out.logits.float().transpose(1, 2), ys, reduction="none") * ws).sum()
            n = world_sum(ws.sum().double()).item()
            opt.zero_grad(set_to_none=True)
            (nll / n).backward()
            for p in model.parameters():  # the gradient of the whole batch's mean: a sum over every process
                if p.grad is not None:
                    world_sum(p.grad)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            mems = out.mems
            total += world_sum(nll.detach().double()).item()
            count += n
        sched.step()
        losses.append(total / count)
        if not args.no_progress and int(os.environ.get("RANK", "0")) == 0:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.6f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t_start
    if world > 1:
        dist.destroy_process_group()
    return {"context_parallel": n_cp, "data_parallel": n_dp, "losses": losses, "seconds": seconds,
            "tokens_per_s": args.steps * args.batch * args.seg_len * args.segments / seconds}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
QUICK = dict(steps=150, batch=8, dim=64, eval_every=50, eval_batches=2, text_mb=2)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short run (150 steps, batch 8, dim 64, 2 MB of text): both tasks in under 3 minutes on "
                        "2 cores; flags given explicitly still win")
    p.add_argument("--task", choices=["text", "recall", "both"], default="both",
                   help="text: bits per byte on standard-library source; recall: answers stored in earlier "
                        "segments (default both)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma list of configurations, of {list(CONFIGS)}: reversible or plain stack, with or "
                        "without memory (default all)")
    p.add_argument("--steps", type=int, default=300, help="training sequences per configuration (default 300)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seg-len", type=int, default=64, help="tokens per segment (default 64)")
    p.add_argument("--segments", type=int, default=4, help="segments per training sequence (default 4)")
    p.add_argument("--mem-len", type=int, default=None,
                   help="memory of each layer, in tokens (default: the earlier segments, (segments - 1) * seg-len)")
    p.add_argument("--positions", choices=["rotary", "relative"], default="rotary",
                   help="rotary phases, or Transformer-XL's relative positions (fused) (default rotary)")
    p.add_argument("--cmem-len", type=int, default=0,
                   help="compressive memory: compressed entries kept per layer (default 0: none)")
    p.add_argument("--compression-rate", type=int, default=4, help="evicted entries per compressed one (default 4)")
    p.add_argument("--compression", choices=["mean", "conv"], default="conv",
                   help="how evicted entries are compressed (default conv, trained by the reconstruction loss)")
    p.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    p.add_argument("--depth", type=int, default=2, help="blocks (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--ff-chunks", type=int, default=2, help="chunks of the feed-forward's sequence (default 2)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the blocks (default 0)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate, 50 warm-up steps (default 2e-3)")
    p.add_argument("--text-mb", type=int, default=8, help="MB of standard-library source to read (default 8)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (default 50)")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per evaluation (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data, the same for every configuration")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default {torch.get_num_threads()})")
    p.add_argument("--out", default=None,
                   help="JSON path (default ./longkernels-bench/train_lm_<machine>.json); a PNG goes beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--context-parallel", type=int, default=None, metavar="N",
                   help="train the text task with each segment sharded over N processes (launch with torchrun; "
                        "1: one process, the reference) and print the per-step losses")
    p.add_argument("--config", help=argparse.SUPPRESS)  # worker mode: run one configuration
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def parse(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    if args.cmem_len < 0 or args.compression_rate < 1:
        p.error("--cmem-len must be >= 0 and --compression-rate >= 1")
    for name in ("steps", "batch", "seg_len", "segments", "dim", "depth", "heads", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mem_len is None:
        args.mem_len = (args.segments - 1) * args.seg_len
    if args.mem_len < 0:
        p.error("--mem-len must be >= 0")
    return args


def run_all(args, argv, runs) -> list[dict]:
    """Each (task, configuration) in a process of its own (its peak resident memory is its own)."""
    passthrough = list(argv if argv is not None else sys.argv[1:])
    results, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        for i, (task, config) in enumerate(runs):
            if i and not args.no_progress:
                elapsed = time.perf_counter() - start
                print(f"[{i}/{len(runs)} runs done in {format_seconds(elapsed)}, "
                      f"~{format_seconds(elapsed / i * (len(runs) - i))} left]", file=sys.stderr, flush=True)
            tmp = Path(tmp_dir) / f"train_lm_{task}_{config}.json"
            cmd = [sys.executable, __file__, *passthrough, "--task", task, "--config", config,
                   "--worker-out", str(tmp)]
            subprocess.run(cmd, check=True)
            results.append(json.loads(tmp.read_text()))
    return results


def print_table(args, results, machine) -> None:
    cmem = f", compressed memory {args.cmem_len} x rate {args.compression_rate} ({args.compression})" \
        if args.cmem_len else ""
    print(f"\nLongContextLM (memory attention, {args.positions} positions), dim {args.dim}, depth {args.depth}, "
          f"segments {args.segments} x {args.seg_len}, mem_len {args.mem_len}{cmem}, batch {args.batch}, "
          f"{args.steps} steps, {machine}, {args.threads} threads")
    header = f"{'task':7} {'config':10} {'loss':>7} {'bpb':>6} {'recall remote':>13} {'recall local':>12} " \
             f"{'tokens/s':>9} {'peak RSS':>9}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        f = r["final"]
        rr = f"{f['remote_recall']:.3f}" if "remote_recall" in f else "-"
        rl = f"{f['local_recall']:.3f}" if "local_recall" in f else "-"
        print(f"{r['task']:7} {r['config']:10} {f['loss']:7.3f} {f['bits_per_byte']:6.3f} {rr:>13} {rl:>12} "
              f"{r['tokens_per_s']:9.0f} {r['peak_rss_bytes'] / 2**20:8.0f}M")
    if any(r["task"] == "recall" for r in results):
        print(f"(chance on recall: {1 / 8:.3f})")


def plot(results, tasks, path: Path) -> None:
    """Held-out bits per byte (text) and recall of remote answers (recall) against training sequences."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in results if r["task"] == task):
            steps = [h["step"] for h in r["history"]]
            key = "remote_recall" if task == "recall" else "bits_per_byte"
            ax.plot(steps, [h.get(key, float("nan")) for h in r["history"]], marker="o", label=r["config"])
        ax.set_title(f"{task}: {'held-out recall of remote answers' if task == 'recall' else 'held-out bits per byte'}")
        ax.set_xlabel("training sequences")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    args = parse(argv)
    if args.config:  # one configuration, in its own process
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return
    if args.context_parallel is not None:
        if args.context_parallel < 1:
            raise SystemExit("--context-parallel must be >= 1")
        res = context_parallel(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res))
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(res, indent=1))
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; choose from {list(CONFIGS)}")
    tasks = ["text", "recall"] if args.task == "both" else [args.task]
    from longkernels._machine import cpu_model, slug
    machine = cpu_model()
    out = Path(args.out) if args.out else Path("longkernels-bench") / f"train_lm_{slug(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = run_all(args, argv, [(task, config) for task in tasks for config in configs])
    print_table(args, results, machine)
    meta = {"machine": machine, "torch": torch.__version__, "longkernels": longkernels.__version__,
            "args": {k: v for k, v in vars(args).items() if k not in ("config", "worker_out", "out")}}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {out}")
    plot(results, tasks, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
