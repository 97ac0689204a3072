"""Worker of tests/test_reversible.py::test_distributed_data_parallel (a module of its own, so that
``torch.multiprocessing.spawn`` can import it in a fresh interpreter)."""
import os

import torch
import torch.distributed as dist
from torch import nn


def build_model(dim: int = 16, depth: int = 3, seed: int = 0):
    from longkernels.nn import ChunkedFeedForward, PreNorm
    from longkernels.reversible import ReversibleBlock, ReversibleSequence

    torch.manual_seed(seed)
    blocks = [ReversibleBlock(PreNorm(dim, nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))),
                              PreNorm(dim, ChunkedFeedForward(dim, 2 * dim, chunks=3)))
              for _ in range(depth)]
    return ReversibleSequence(blocks).double()


def batch(dim: int = 16, batch_size: int = 4, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, length, dim, generator=g, dtype=torch.float64)
    target = torch.randn(batch_size, length, dim, generator=g, dtype=torch.float64)
    return x, target


def loss_fn(y, target):
    return (y - target).pow(2).mean()


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One training step on this rank's half of the batch, under DDP with find_unused_parameters False
    and True (the latter walks the autograd graph from the outputs to find the parameters)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {}
        for find_unused in (False, True):
            model = build_model()
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
            x, target = batch()
            per = x.shape[0] // world_size
            xs = x[rank * per:(rank + 1) * per].clone().requires_grad_()
            loss = loss_fn(ddp(xs), target[rank * per:(rank + 1) * per])
            loss.backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            results[find_unused] = {"params": grads, "x": xs.grad.clone()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
