"""Worker of tests/test_distributed.py: one process of a gloo group (a module of its own, so that
``torch.multiprocessing`` can import it in a fresh interpreter). Each rank runs every case on its shard of
inputs drawn from the case's seed (the same full tensors on every rank) and saves its local results; the
test compares them with single-process ``memory_attention`` on the full tensors."""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist


def full_inputs(case: dict):
    """The whole sequence's q, k, v, output and LSE gradients, and ALiBi slopes, from the case's seed."""
    g = torch.Generator().manual_seed(case["seed"])
    B, H, Hkv, T, D, Dv = (case[x] for x in ("B", "H", "Hkv", "T", "D", "Dv"))
    dtype = getattr(torch, case["dtype"])

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(B, H, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, Dv)
    dout, dlse = rnd(B, H, T, Dv), torch.randn(B, H, T, generator=g, dtype=torch.float64)
    slopes = torch.rand(H, generator=g, dtype=torch.float64) * 0.5 if case.get("alibi") else None
    M = case.get("M", 0)
    mem = (rnd(B, Hkv, M, D), rnd(B, Hkv, M, Dv)) if M else (None, None)
    return q, k, v, dout, dlse, slopes, mem


def relative_inputs(case: dict) -> dict:
    """Transformer-XL relative positions for the whole sequence (P longer than needed), or {}."""
    if not case.get("rel"):
        return {}
    g = torch.Generator().manual_seed(case["seed"] + 3)
    H, D, dtype = case["H"], case["D"], getattr(torch, case["dtype"])
    P = case.get("M", 0) + case["T"] + 3
    rnd = lambda *shape: (0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return dict(pos_emb=rnd(H, P, D), content_bias=rnd(H, D), pos_bias=rnd(H, D))


def build_lm(case: dict, group=None):
    from longkernels.nn import LongContextLM

    torch.manual_seed(case["seed"])
    return LongContextLM(50, 16, 2, 4, attention="memory", mem_len=case["M"], window=case.get("window"),
                         num_kv_heads=2, reversible=case.get("reversible", True), dtype=torch.float64,
                         context_parallel_group=group, positions="relative" if case.get("rel") else None)


def lm_tokens(case: dict):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.randint(0, 50, (2, case["segments"] * case["T"]), generator=g)


def run_lm(case: dict, model, group=None, shard=None) -> dict:
    """Segments of T tokens with memory carried; the loss of every segment's logits backpropagated."""
    tokens, mems, logits = lm_tokens(case), None, []
    g = torch.Generator().manual_seed(case["seed"] + 2)
    weights = torch.randn(2, tokens.shape[1], 50, generator=g, dtype=torch.float64)
    loss = 0.0
    for s in range(case["segments"]):
        xs = tokens[:, s * case["T"]:(s + 1) * case["T"]]
        ws = weights[:, s * case["T"]:(s + 1) * case["T"]]
        if shard is not None:
            xs, ws = shard(xs, 1, group), shard(ws, 1, group)
        out = model(xs, mems)
        loss = loss + (out.logits * ws).sum()
        mems = out.mems
        logits.append(out.logits.detach())
    loss.backward()
    return {"logits": torch.stack(logits, 1), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def run_case(case: dict, group=None) -> dict:
    from longkernels import distributed as cp

    if case["fn"] == "lm":
        group = group if group is not None else dist.group.WORLD  # the model's None means "not sharded"
        if case.get("bad"):  # relative positions with heads the group's size does not divide
            try:
                build_lm(case, group)
            except ValueError as e:
                return {"error": str(e)}
            return {"error": None}
        res = run_lm(case, build_lm(case, group), group, cp.shard_sequence)
        res["positions"] = cp.sequence_positions(case["T"], group)
        return res

    q, k, v, dout, dlse, slopes, (mk, mv) = full_inputs(case)
    fn = cp.ring_attention if case["fn"] == "ring" else cp.ulysses_attention
    if case.get("bad"):
        return bad_input(case, fn, q, k, v, group, mk, mv)
    ql, kl, vl = (cp.shard_sequence(t, 2, group).detach().requires_grad_() for t in (q, k, v))
    mem = {}
    if mk is not None:
        mem = dict(mem_k=mk.requires_grad_(), mem_v=mv.requires_grad_())
    rel = {name: t.requires_grad_() for name, t in relative_inputs(case).items()}
    out, lse = fn(ql, kl, vl, group=group, causal=case["causal"], window=case.get("window"),
                  alibi_slopes=slopes, return_lse=True, **mem, **rel)
    dl = cp.shard_sequence(dlse, 2, group).to(lse.dtype)
    loss = (out * cp.shard_sequence(dout, 2, group)).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dl).sum()
    loss.backward()
    full = cp.gather_sequence(out.detach(), 2, group)
    res = {"positions": cp.sequence_positions(case["T"], group), "out": out.detach(), "lse": lse.detach(),
           "dq": ql.grad, "dk": kl.grad, "dv": vl.grad, "gathered": full}
    if mk is not None:  # each rank's part of the memory's gradient; the test sums them
        res.update(dmk=mk.grad, dmv=mv.grad, tail_k=cp.gather_tail(kl.detach(), case["tail"], group))
    res.update({"d" + name: t.grad for name, t in rel.items()})  # each rank's heads' part; the test sums them
    return res


def bad_input(case, fn, q, k, v, group, mk=None, mv=None) -> dict:
    """Each rank passes the case's own wrong input; every rank must raise a ValueError."""
    from longkernels import distributed as cp

    rank = dist.get_rank(group)
    ql, kl, vl = (cp.shard_sequence(t, 2, group) for t in (q, k, v))
    if case["bad"] == "length" and rank == 0:
        ql, kl, vl = (t[:, :, 3:] for t in (ql, kl, vl))  # local lengths differ by at most 2 in the layout
    if case["bad"] == "dtype" and rank == 0:
        ql, kl, vl = (t.float() for t in (ql, kl, vl))
    kwargs = dict(causal=case["causal"], window=case.get("window"))
    if case["bad"] == "window" and rank == 0:
        kwargs["window"] = (case.get("window") or 4) + 1
    if mk is not None:
        kwargs.update(mem_k=mk, mem_v=mv)
    rel = relative_inputs(case)
    if case["bad"] == "pos_emb" and rank == 0:  # still long enough, but not the other ranks' tensor
        rel["pos_emb"] = rel["pos_emb"][:, :-1]
    if case["bad"] == "short_pos":  # long enough for every rank's own rows, not for the whole sequence
        rel["pos_emb"] = rel["pos_emb"][:, : case["M"] + case["T"] - 1]
    kwargs.update(rel)
    try:
        fn(ql, kl, vl, group=group, **kwargs)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def worker(rank: int, world_size: int, port: int, out_dir: str, cases: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for case in cases:
            try:
                results[case["id"]] = run_case(case)
            except Exception:  # noqa: BLE001 - reported to the test, which fails with it
                results[case["id"]] = {"exception": traceback.format_exc()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
