"""Context parallelism over ``torch.distributed``: ring attention and Ulysses (docs/semantics.md §8).

Each rank of a process group of size ``W`` holds part of the sequence. The sequence of length ``T`` is cut
into ``2W`` chunks (``torch.tensor_split``'s sizes: the first ``T % 2W`` one row longer) and rank ``r``
holds chunks ``r`` and ``2W - 1 - r`` (the zigzag layout: every rank gets the same causal work).
:func:`shard_sequence` and :func:`gather_sequence` cut a full tensor into this rank's part and put it back.

:func:`ring_attention`: key/value blocks travel between ranks while each computes its part; the block pairs
are single calls of the fused kernels with the query block's position relative to the key block
(``q_offset``), so the causal diagonal, earlier blocks and partial window blocks are all one kernel; the
parts merge by their log-sum-exp in float32 (:func:`longkernels.merge_attention`'s rule). The schedule is a
plan every rank computes alike from ``(W, T, causal, window)``: in round ``d`` rank ``r`` sends to
``r + d`` exactly the rows of its two chunks that some query of ``r + d`` can see (all of them without a
window; with a window, the tail the window reaches, and nothing at all to ranks it cannot reach, so those
rounds do not happen), and receives from ``r - d``. Round ``d + 1``'s messages are in flight while round
``d`` computes. The backward sends the key blocks again and returns each block's dK/dV (float32) to its
owner. Messages carry the Hkv key/value heads only (GQA).

:func:`ulysses_attention`: two all-to-alls over heads (DeepSpeed-Ulysses); each rank runs
:func:`longkernels.memory_attention` over the whole sequence for ``H / W`` heads.

Both check first, with one small all-gather, that every rank of the group passed the same shapes, dtype
and options (and lengths that fit the layout): a mismatch raises the same ``ValueError`` on every rank
rather than hanging in a collective. docs/performance.md gives each strategy's communication volume.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .ops import memory_attention as _ma
from .ops.validation import INT64_MAX, check_int, check_scale, lse_dtype
from .reference import memory_attention as _reference

__all__ = ["gather_sequence", "gather_tail", "ring_attention", "sequence_positions", "shard_sequence", "total_length",
           "ulysses_attention", "zigzag_layout"]


# --------------------------------------------------------------------------------------------
# The zigzag layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZigzagLayout:
    """``T`` positions in ``2W`` chunks; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``."""

    W: int
    T: int

    @property
    def base(self) -> int:
        return self.T // (2 * self.W)

    @property
    def rem(self) -> int:
        return self.T % (2 * self.W)

    @property
    def C(self) -> int:
        """The longest chunk's length: every block is padded to it."""
        return self.base + (self.rem > 0)

    def length(self, c: int) -> int:
        return self.base + (c < self.rem)

    def start(self, c: int) -> int:
        return c * self.base + min(c, self.rem)

    def chunks(self, r: int) -> tuple[int, int]:
        return r, 2 * self.W - 1 - r

    def local_length(self, r: int) -> int:
        return sum(self.length(c) for c in self.chunks(r))

    def positions(self, r: int) -> torch.Tensor:
        """The absolute positions of rank ``r``'s rows, in its local order."""
        return torch.cat([torch.arange(self.start(c), self.start(c) + self.length(c)) for c in self.chunks(r)])


def zigzag_layout(length: int, world_size: int) -> ZigzagLayout:
    check_int("length", length, minimum=0)
    check_int("world_size", world_size, minimum=1)
    return ZigzagLayout(world_size, length)


def _group_rank(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("longkernels.distributed needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_world_size(g), dist.get_rank(g)


def _peer(group, r: int) -> int:
    return dist.get_global_rank(group, r) if group is not dist.group.WORLD else r


def sequence_positions(length: int, group=None) -> torch.Tensor:
    """Absolute positions (int64) of this rank's rows of a ``length``-long sequence, in local order: what
    rotary phases and position embeddings of a sharded model take."""
    g, W, r = _group_rank(group)
    return zigzag_layout(length, W).positions(r)


def total_length(local_length: int, group=None) -> int:
    """The whole sequence's length from every rank's local length (one all-reduce)."""
    g, W, r = _group_rank(group)
    return sum(m[0] for m in _exchange_meta([local_length], g, W))


def shard_sequence(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's rows of the full ``x`` along ``dim`` (chunks ``r`` and ``2W - 1 - r``, concatenated).

    Every rank passes the same full tensor. Differentiable (the gradient reaches this rank's rows of ``x``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    g, W, r = _group_rank(group)
    dim = _dim(dim, x)
    lay = zigzag_layout(x.shape[dim], W)
    parts = [x.narrow(dim, lay.start(c), lay.length(c)) for c in lay.chunks(r)]
    return torch.cat(parts, dim=dim)


def _dim(dim, x):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must lie in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim}")
    return dim % x.dim()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, W, r, lengths):
        ctx.args = (dim, group, W, r, lengths)
        T = sum(lengths)
        lay = zigzag_layout(T, W)
        parts = _all_to_all_p2p([x] * W, [_with_dim(x.shape, dim, n) for n in lengths], x.dtype, x.device, group,
                                W, r)
        out_shape = _with_dim(x.shape, dim, T)
        out = x.new_empty(out_shape)
        for s, part in enumerate(parts):
            off = 0
            for c in lay.chunks(s):
                out.narrow(dim, lay.start(c), lay.length(c)).copy_(part.narrow(dim, off, lay.length(c)))
                off += lay.length(c)
        return out

    @staticmethod
    def backward(ctx, grad):
        dim, group, W, r, lengths = ctx.args
        # Every rank's loss may read every row: this rank's rows get the sum of all ranks' gradients.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        lay = zigzag_layout(grad.shape[dim], W)
        return (torch.cat([grad.narrow(dim, lay.start(c), lay.length(c)) for c in lay.chunks(r)], dim=dim),
                None, None, None, None, None)


def _with_dim(shape, dim, n):
    s = list(shape)
    s[dim] = n
    return tuple(s)


def gather_sequence(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """The full tensor from every rank's part along ``dim`` (the inverse of :func:`shard_sequence`), on every
    rank. Differentiable: the backward sums the ranks' gradients of the full tensor and keeps this rank's rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    g, W, r = _group_rank(group)
    dim = _dim(dim, x)
    shape = [s if i != dim else 0 for i, s in enumerate(x.shape)]
    meta = [x.shape[dim], x.dim(), zlib.crc32(str(x.dtype).encode()), *(shape + [-1] * 8)[:8],
            zlib.crc32(str(shape).encode())]  # a fixed length on every rank
    rows = _exchange_meta(meta, g, W)
    lengths = [int(m[0]) for m in rows]
    if any(m[1:] != rows[0][1:] for m in rows):
        raise ValueError("gather_sequence: every rank must pass a tensor of one dtype and one shape outside `dim`, "
                         f"got (dim length, ndim, dtype code, shape...) {rows}")
    lay = zigzag_layout(sum(lengths), W)
    if lengths != [lay.local_length(s) for s in range(W)]:
        raise ValueError(f"gather_sequence: the ranks' lengths {lengths} are not the zigzag layout of "
                         f"{sum(lengths)} positions over {W} ranks (shard_sequence's)")
    return _Gather.apply(x, dim, g, W, r, lengths)


# --------------------------------------------------------------------------------------------
# Communication helpers
# --------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _exchange_meta(values, group, W) -> list[list[int]]:
    """All ranks' integer lists (same length on every rank by construction)."""
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if W == 1:
        return [t.tolist()]
    # gloo and NCCL both take CPU int64 for gloo; NCCL needs the device of the process.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
    t = t.to(dev)
    out = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(out, t, group=group)
    return [o.cpu().tolist() for o in out]


def _post(sends, recvs, group):
    """Posts point-to-point messages: sends [(tensor, group rank)], recvs [(tensor, group rank)]."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, p), group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, p), group) for t, p in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs):
    for q in reqs:
        q.wait()


def _all_to_all_p2p(sends, recv_shapes, dtype, device, group, W, r):
    """sends[j] goes to rank j; returns what each rank sent here (rank r's own part without a message)."""
    recvs = [None] * W
    send_ops, recv_ops = [], []
    for j in range(W):
        if j == r:
            recvs[j] = sends[j]
            continue
        recvs[j] = torch.empty(recv_shapes[j], dtype=dtype, device=device)
        send_ops.append((sends[j].contiguous(), j))
        recv_ops.append((recvs[j], j))
    _wait(_post(send_ops, recv_ops, group))
    return recvs


# --------------------------------------------------------------------------------------------
# The plan: which rows of which chunk every round sends (the same on every rank)
# --------------------------------------------------------------------------------------------
def _visible(lay: ZigzagLayout, a: int, b: int, causal: bool, window: int) -> Optional[tuple[int, int]]:
    """Rows [lo, hi) of key chunk b that some query of chunk a sees, or None."""
    na, nb = lay.length(a), lay.length(b)
    if na == 0 or nb == 0:
        return None
    qa, kb = lay.start(a), lay.start(b)
    lo = max(0, qa - window + 1 - kb) if window else 0
    hi = min(nb, qa + na - kb) if causal else nb
    return (lo, hi) if hi > lo else None


def _need(lay, dst: int, b: int, causal, window) -> Optional[tuple[int, int]]:
    """Rows of chunk b that rank dst needs: the hull over its two query chunks."""
    rs = [x for x in (_visible(lay, a, b, causal, window) for a in lay.chunks(dst)) if x is not None]
    if not rs:
        return None
    return min(x[0] for x in rs), max(x[1] for x in rs)


@dataclass
class _Plan:
    lay: ZigzagLayout
    causal: bool
    window: int
    rounds: list  # d = 1..W-1 with at least one message somewhere

    messages: dict  # (src, d): [(chunk, lo, hi)] that src sends to src + d

    def message(self, src: int, d: int):
        """[(chunk, lo, hi)] that src sends to src + d (empty: no message)."""
        return self.messages[src, d]


def _message(lay, src, d, causal, window):
    dst = (src + d) % lay.W
    out = []
    for b in lay.chunks(src):
        rng = _need(lay, dst, b, causal, window)
        if rng is not None:
            out.append((b, *rng))
    return out


def _plan(lay, causal, window) -> _Plan:
    messages = {(s, d): _message(lay, s, d, causal, window) for d in range(1, lay.W) for s in range(lay.W)}
    rounds = [d for d in range(1, lay.W) if any(messages[s, d] for s in range(lay.W))]
    return _Plan(lay, causal, window, rounds, messages)


def bytes_sent(length: int, world_size: int, *, heads_kv: int, head_dim: int, head_dim_v: Optional[int] = None,
               batch: int = 1, element_size: int = 2, causal: bool = True, window: Optional[int] = None) -> dict:
    """Bytes the ring's forward sends (in all, over every rank) for these shapes, from the plan; and the full
    ring's (every rank's whole K/V to every other rank) for comparison."""
    lay = zigzag_layout(length, world_size)
    plan = _plan(lay, causal, int(window or 0))
    row = batch * heads_kv * (head_dim + (head_dim_v or head_dim)) * element_size
    sent = sum(hi - lo for d in plan.rounds for s in range(world_size) for _, lo, hi in plan.message(s, d)) * row
    full = sum(lay.local_length(s) for s in range(world_size)) * (world_size - 1) * row
    return {"bytes": sent, "full_ring_bytes": full, "rounds": len(plan.rounds)}


# --------------------------------------------------------------------------------------------
# Block kernels: one call per (query chunk, key chunk) pair
# --------------------------------------------------------------------------------------------
def _ref_fwd(q, k, v, mk, mv, alibi, causal, window, scale, kpm, docs, cap, sinks, q_offset):
    with torch.no_grad():
        out, lse = _reference.memory_attention(q, k, v, causal=causal, window=window or None, scale=scale,
                                               alibi_slopes=alibi, return_lse=True, key_padding_mask=kpm,
                                               q_offset=q_offset)
    return out, lse.to(lse_dtype(q.dtype))


def _ref_bwd(dout, q, k, v, mk, mv, alibi, lse, delta, causal, window, scale, kpm, docs, cap, q_offset):
    """The reference's gradients with the given (global) LSE and delta: P = exp(S - lse), dS = P (dP - delta)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, N, D = q.shape
    G = H // k.shape[1]
    kk, vv = k.to(cdt).repeat_interleave(G, 1), v.to(cdt).repeat_interleave(G, 1)
    s = torch.matmul(q.to(cdt), kk.transpose(-1, -2)) * scale
    if alibi is not None:
        pos = torch.arange(N, device=q.device)
        dist_ = (pos.unsqueeze(1) + q_offset - pos.unsqueeze(0)).to(cdt)
        s = s - alibi.to(cdt).view(1, H, 1, 1) * dist_
    vis = _reference.visible_keys(N, 0, causal=causal, window=window or None, key_padding_mask=kpm,
                                  device=q.device, q_offset=q_offset).unsqueeze(1)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse).to(cdt)
    p = torch.exp(s - safe.unsqueeze(-1)).masked_fill(~vis, 0.0)
    do = dout.to(cdt)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vv.transpose(-1, -2)) - delta.to(cdt).unsqueeze(-1))
    dq = torch.matmul(ds, kk) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cdt)) * scale
    fold = lambda t: t.view(B, k.shape[1], G, N, t.shape[-1]).sum(2)  # noqa: E731
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype), mk, mv


def _block_ops(q, v):
    name = _ma.choose_backend(q, v, None)
    if name == "reference":
        return _ref_fwd, _ref_bwd
    return _ma._kernels(name)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t (B, h, rows, d) with rows <= n, padded with zero rows at the end to n."""
    if t.shape[2] == n:
        return t
    out = t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3])
    out[:, :, : t.shape[2]] = t
    return out


def _split_local(t: torch.Tensor, lay: ZigzagLayout, r: int) -> list[torch.Tensor]:
    """A rank's local rows as its two chunks, each padded to C rows."""
    c0, c1 = lay.chunks(r)
    n0 = lay.length(c0)
    return [_pad_rows(t.narrow(2, 0, n0), lay.C), _pad_rows(t.narrow(2, n0, lay.length(c1)), lay.C)]


def _join_local(parts, lay, r, dim=2):
    return torch.cat([p.narrow(dim, 0, lay.length(c)) for p, c in zip(parts, lay.chunks(r))], dim=dim)


class _Blocks:
    """The key chunks one round makes available: [(chunk, k (B, Hkv, C, D), v, kpm (B, C) or None)]."""

    @staticmethod
    def local(lay, r, k_parts, v_parts):
        out = []
        for c, kc, vc in zip(lay.chunks(r), k_parts, v_parts):
            kpm = None
            if lay.length(c) < lay.C:
                kpm = torch.zeros(kc.shape[0], lay.C, dtype=torch.bool, device=kc.device)
                kpm[:, lay.length(c):] = True
            out.append((c, kc, vc, kpm))
        return out


def _pack(msg, k_parts, v_parts, lay, r):
    """One flat buffer of the rows ``msg`` names of this rank's chunks: k rows then v rows, per chunk."""
    pieces = []
    for b, lo, hi in msg:
        i = lay.chunks(r).index(b)
        pieces.append(k_parts[i][:, :, lo:hi].reshape(-1))
        pieces.append(v_parts[i][:, :, lo:hi].reshape(-1))
    return torch.cat(pieces)


def _unpack(buf, msg, lay, B, Hkv, D, Dv):
    """The key chunks of a received buffer, each padded to C rows, with a mask over the rows not sent."""
    out, off = [], 0
    for b, lo, hi in msg:
        n = hi - lo
        kr = buf[off: off + B * Hkv * n * D].view(B, Hkv, n, D)
        off += B * Hkv * n * D
        vr = buf[off: off + B * Hkv * n * Dv].view(B, Hkv, n, Dv)
        off += B * Hkv * n * Dv
        if lo == 0 and n == lay.C:
            out.append((b, kr, vr, None, lo, hi))
            continue
        kb = buf.new_zeros(B, Hkv, lay.C, D)
        vb = buf.new_zeros(B, Hkv, lay.C, Dv)
        kb[:, :, lo:hi] = kr
        vb[:, :, lo:hi] = vr
        kpm = torch.ones(B, lay.C, dtype=torch.bool, device=buf.device)
        kpm[:, lo:hi] = False
        out.append((b, kb, vb, kpm, lo, hi))
    return out


def _msg_numel(msg, B, Hkv, D, Dv):
    return sum((hi - lo) * B * Hkv * (D + Dv) for _, lo, hi in msg)


def _merge_into(acc_o, acc_lse, o, lse):
    """acc = merge(acc, (o, lse)) in place, in float32 / float64 (semantics §7)."""
    o = o.to(acc_o.dtype)
    m = torch.maximum(acc_lse, lse)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w_a = torch.exp(acc_lse - m_safe)
    w_b = torch.exp(lse - m_safe)
    tot = w_a + w_b
    new_lse = m_safe + torch.log(tot)
    inv = torch.where(tot > 0, 1.0 / tot, torch.zeros_like(tot))
    acc_o.mul_((w_a * inv).unsqueeze(-1)).add_(o * (w_b * inv).unsqueeze(-1))
    acc_lse.copy_(new_lse)


# --------------------------------------------------------------------------------------------
# Ring attention
# --------------------------------------------------------------------------------------------
@dataclass
class _RingConfig:
    group: object
    W: int
    r: int
    plan: _Plan
    causal: bool
    window: int
    scale: float
    M: int = 0  # memory (on every rank) before the sequence: positions 0 .. M - 1, the sequence at M ..
    # What runs (the context-parallel benchmark times each apart): "both"; "compute" (no messages: received
    # buffers stand in, the same sizes); "comm" (the messages, no block computed).
    measure: str = "both"

    def mem_visible(self, a: int) -> bool:
        """Whether some query of chunk a sees the memory (every memory key precedes every query)."""
        lay = self.plan.lay
        return self.M > 0 and lay.length(a) > 0 and (not self.window or lay.start(a) < self.window - 1)

    def mem_mask(self, B, device):
        """The memory block's key_padding_mask: the memory's M keys, then C hidden stand-ins for the segment
        keys the op's geometry needs (whole tiles of them are skipped)."""
        kpm = torch.zeros(B, self.M + self.plan.lay.C, dtype=torch.bool, device=device)
        kpm[:, self.M:] = True
        return kpm


def _post_kv(cfg: _RingConfig, d: int, k_parts, v_parts, q):
    """Round d's key/value messages: this rank's rows for r + d out, r - d's rows for this rank in.
    Returns (requests, receive buffer, what it holds)."""
    lay, r = cfg.plan.lay, cfg.r
    B, Hkv, D, Dv = k_parts[0].shape[0], k_parts[0].shape[1], k_parts[0].shape[3], v_parts[0].shape[3]
    src, dst = (r - d) % cfg.W, (r + d) % cfg.W
    out_msg, in_msg = cfg.plan.message(r, d), cfg.plan.message(src, d)
    sends = [(_pack(out_msg, k_parts, v_parts, lay, r), dst)] if out_msg else []
    buf = q.new_zeros(_msg_numel(in_msg, B, Hkv, D, Dv)) if in_msg else None
    if cfg.measure == "compute":  # the benchmark's compute-only step: the buffer stands in, nothing travels
        return [], buf, in_msg
    return _post(sends, [(buf, src)] if in_msg else [], cfg.group), buf, in_msg


def _ring_forward(cfg: _RingConfig, q, k, v, mem_k, mem_v, alibi, fwd):
    lay, r = cfg.plan.lay, cfg.r
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    ct = lse_dtype(q.dtype)
    q_parts, k_parts, v_parts = (_split_local(t, lay, r) for t in (q, k, v))
    acc_o = [torch.zeros(B, H, lay.C, Dv, dtype=ct, device=q.device) for _ in range(2)]
    acc_l = [torch.full((B, H, lay.C), float("-inf"), dtype=ct, device=q.device) for _ in range(2)]

    def compute(blocks):
        if cfg.measure == "comm":
            return
        for ai, a in enumerate(lay.chunks(r)):
            for b, kb, vb, kpm, *_ in blocks:
                if _visible(lay, a, b, cfg.causal, cfg.window) is None:
                    continue
                o, lse = fwd(q_parts[ai], kb, vb, kb[:, :, :0], vb[:, :, :0], alibi, cfg.causal, cfg.window,
                             cfg.scale, kpm, None, 0.0, None, lay.start(a) - lay.start(b))
                _merge_into(acc_o[ai], acc_l[ai], o, lse)

    def post(d):
        return _post_kv(cfg, d, k_parts, v_parts, q)

    rounds = cfg.plan.rounds
    pending = post(rounds[0]) if rounds else None
    if cfg.M:
        kpm = cfg.mem_mask(B, q.device)
        for ai, a in enumerate(lay.chunks(r)):
            if cfg.mem_visible(a):
                o, lse = fwd(q_parts[ai], k_parts[ai], v_parts[ai], mem_k, mem_v, alibi, cfg.causal, cfg.window,
                             cfg.scale, kpm, None, 0.0, None, cfg.M + lay.start(a))
                _merge_into(acc_o[ai], acc_l[ai], o, lse)
    compute(_Blocks.local(lay, r, k_parts, v_parts))
    for i in range(len(rounds)):
        reqs, buf, in_msg = pending
        _wait(reqs)
        pending = post(rounds[i + 1]) if i + 1 < len(rounds) else None
        if in_msg:
            compute(_unpack(buf, in_msg, lay, B, Hkv, D, Dv))
    out = _join_local(acc_o, lay, r).to(q.dtype)
    lse = _join_local(acc_l, lay, r)
    return out, lse


def _ring_backward(cfg: _RingConfig, dout, q, k, v, mem_k, mem_v, out, lse, dlse, alibi, bwd):
    lay, r = cfg.plan.lay, cfg.r
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    ct = lse_dtype(q.dtype)
    delta = (dout.to(ct) * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    q_parts, k_parts, v_parts, do_parts = (_split_local(t, lay, r) for t in (q, k, v, dout.to(q.dtype)))
    # Padded query rows: LSE -inf (read as "saw nothing": P = 0) and delta 0, so they add nothing.
    lse_parts = [t.squeeze(-1) for t in _split_local(lse.unsqueeze(-1), lay, r)]
    for t, c in zip(lse_parts, lay.chunks(r)):
        if lay.length(c) < lay.C:  # a padded copy: its extra rows
            t[:, :, lay.length(c):] = float("-inf")
    delta_parts = [t.squeeze(-1) for t in _split_local(delta.unsqueeze(-1), lay, r)]
    dq = [torch.zeros(B, H, lay.C, D, dtype=ct, device=q.device) for _ in range(2)]
    dk = [torch.zeros(B, Hkv, lay.C, D, dtype=ct, device=q.device) for _ in range(2)]
    dv = [torch.zeros(B, Hkv, lay.C, Dv, dtype=ct, device=q.device) for _ in range(2)]

    def compute(blocks):
        """dq into this rank's accumulators; returns {chunk: (dk, dv)} of the blocks' keys (float32)."""
        grads = {}
        for b, kb, vb, kpm, *_ in blocks:
            gk = torch.zeros(B, Hkv, lay.C, D, dtype=ct, device=q.device)
            gv = torch.zeros(B, Hkv, lay.C, Dv, dtype=ct, device=q.device)
            grads[b] = (gk, gv)
            if cfg.measure == "comm":
                continue
            for ai, a in enumerate(lay.chunks(r)):
                if _visible(lay, a, b, cfg.causal, cfg.window) is None:
                    continue
                gq, gkb, gvb, _, _ = bwd(do_parts[ai], q_parts[ai], kb, vb, kb[:, :, :0], vb[:, :, :0], alibi,
                                         lse_parts[ai], delta_parts[ai], cfg.causal, cfg.window, cfg.scale, kpm,
                                         None, 0.0, lay.start(a) - lay.start(b))
                dq[ai].add_(gq)
                gk.add_(gkb)
                gv.add_(gvb)
        return grads

    def post_kv(d):
        return _post_kv(cfg, d, k_parts, v_parts, q)

    def post_grads(d, in_msg, grads):
        """Returns the key gradients of round d's blocks to their owner (r - d); receives ours from r + d."""
        src, dst = (r - d) % cfg.W, (r + d) % cfg.W
        sends = []
        if in_msg:
            pieces = []
            for b, lo, hi in in_msg:
                gk, gv = grads[b]
                pieces += [gk[:, :, lo:hi].reshape(-1), gv[:, :, lo:hi].reshape(-1)]
            sends = [(torch.cat(pieces), src)]
        back_msg = cfg.plan.message(r, d)  # what we sent to r + d: its gradients come back
        buf = torch.zeros(_msg_numel(back_msg, B, Hkv, D, Dv), dtype=ct, device=q.device) if back_msg else None
        if cfg.measure == "compute":
            return [], buf, back_msg
        return _post(sends, [(buf, dst)] if back_msg else [], cfg.group), buf, back_msg

    def add_grads(pending):
        reqs, buf, msg = pending
        _wait(reqs)
        off = 0
        for b, lo, hi in msg:
            i = lay.chunks(r).index(b)
            n = hi - lo
            dk[i][:, :, lo:hi] += buf[off: off + B * Hkv * n * D].view(B, Hkv, n, D)
            off += B * Hkv * n * D
            dv[i][:, :, lo:hi] += buf[off: off + B * Hkv * n * Dv].view(B, Hkv, n, Dv)
            off += B * Hkv * n * Dv

    rounds = cfg.plan.rounds
    pending_kv = post_kv(rounds[0]) if rounds else None
    dmk = dmv = None
    if cfg.M:
        kpm = cfg.mem_mask(B, q.device)
        dmk = torch.zeros(mem_k.shape, dtype=ct, device=q.device)
        dmv = torch.zeros(mem_v.shape, dtype=ct, device=q.device)
        for ai, a in enumerate(lay.chunks(r)):
            if cfg.mem_visible(a):
                gq, _, _, gmk, gmv = bwd(do_parts[ai], q_parts[ai], k_parts[ai], v_parts[ai], mem_k, mem_v, alibi,
                                         lse_parts[ai], delta_parts[ai], cfg.causal, cfg.window, cfg.scale, kpm,
                                         None, 0.0, cfg.M + lay.start(a))
                dq[ai].add_(gq)
                dmk.add_(gmk)
                dmv.add_(gmv)
    for c, (gk, gv) in compute(_Blocks.local(lay, r, k_parts, v_parts)).items():
        i = lay.chunks(r).index(c)
        dk[i].add_(gk)
        dv[i].add_(gv)
    pending_grads = None
    for i in range(len(rounds)):
        reqs, buf, in_msg = pending_kv
        _wait(reqs)
        pending_kv = post_kv(rounds[i + 1]) if i + 1 < len(rounds) else None
        grads = compute(_unpack(buf, in_msg, lay, B, Hkv, D, Dv)) if in_msg else {}
        if pending_grads is not None:
            add_grads(pending_grads)
        pending_grads = post_grads(rounds[i], in_msg, grads)
    if pending_grads is not None:
        add_grads(pending_grads)
    return (_join_local(dq, lay, r).to(q.dtype), _join_local(dk, lay, r).to(k.dtype),
            _join_local(dv, lay, r).to(v.dtype), None if dmk is None else dmk.to(mem_k.dtype),
            None if dmv is None else dmv.to(mem_v.dtype))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, alibi, cfg):
        fwd, bwd = _block_ops(q, v)
        out, lse = _ring_forward(cfg, q, k, v, mem_k, mem_v, alibi, fwd)
        ctx.save_for_backward(q, k, v, mem_k, mem_v, alibi, out, lse)
        ctx.cfg, ctx.bwd = cfg, bwd
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mem_k, mem_v, alibi, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dmk, dmv = _ring_backward(ctx.cfg, dout, q, k, v, mem_k, mem_v, out, lse, dlse, alibi, ctx.bwd)
        return dq, dk, dv, dmk, dmv, None, None


def _validate_local(fn, q, k, v, causal, window, scale, alibi_slopes):
    """Local checks (as memory_attention's, a rank may hold no rows); returns (window, scale, alibi)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D (B, heads, local length, head dim), got {tuple(t.shape)}")
    if q.shape[2] == 0:  # memory_attention's checks need a query; check the rest on one dummy row
        _ma.validate(q.new_empty(*q.shape[:2], 1, q.shape[3]), k.new_empty(*k.shape[:2], 1, k.shape[3]),
                     v.new_empty(*v.shape[:2], 1, v.shape[3]), None, None, causal, None, scale, alibi_slopes)
        if k.shape[2] != 0 or v.shape[2] != 0:
            raise ValueError(f"{fn}: k and v must hold as many rows as q (0), got {k.shape[2]} and {v.shape[2]}")
    else:
        _ma.validate(q, k, v, None, None, causal, None, scale, alibi_slopes)
    w = 0 if window is None else check_int("window", window, minimum=1, maximum=INT64_MAX)
    s = check_scale("scale", scale, default=q.shape[-1] ** -0.5)
    alibi = None if alibi_slopes is None else alibi_slopes.to(lse_dtype(q.dtype)).contiguous()
    return w, s, alibi


def _check_group(fn, q, k, v, causal, window, scale, alibi, g, W, extra=(), extra_names=()):
    """One all-gather of every rank's shapes and options; the same ValueError on every rank on a mismatch."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    scale_bits = int(torch.tensor([scale], dtype=torch.float64).view(torch.int64).item())
    meta = [q.shape[2], k.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
            _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1, int(causal), window, int(alibi is not None),
            scale_bits, int(grad), q.device.type == "cuda", *extra]
    rows = _exchange_meta(meta, g, W)
    names = ["local length", "k's local length", "B", "H", "Hkv", "D", "Dv", "dtype", "causal", "window",
             "alibi_slopes given", "scale", "requires grad", "on CUDA", *extra_names]
    for i, name in enumerate(names[2:], start=2):
        vals = [m[i] for m in rows]
        if len(set(vals)) > 1:
            shown = [_DTYPES[x] if 0 <= x < len(_DTYPES) else x for x in vals] if name == "dtype" else vals
            raise ValueError(f"{fn}: every rank of the group must pass the same {name}; the ranks have {shown}")
    lengths = [m[0] for m in rows]
    lay = zigzag_layout(sum(lengths), W)
    if lengths != [lay.local_length(s) for s in range(W)] or any(m[1] != m[0] for m in rows):
        raise ValueError(f"{fn}: the ranks' local lengths {lengths} (keys {[m[1] for m in rows]}) are not the "
                         f"zigzag layout of {sum(lengths)} positions over {W} ranks: shard the sequence with "
                         "longkernels.distributed.shard_sequence")
    return lay


def ring_attention(q, k, v, *, group=None, causal=True, window=None, scale=None, alibi_slopes=None,
                   return_lse=False, mem_k=None, mem_v=None):
    """Attention over a sequence sharded across a process group (zigzag layout), by a ring of block pairs.

    Args:
        q: ``(B, H, n_r, D)``, this rank's queries (``shard_sequence`` of the full ``(B, H, T, D)``).
        k, v: ``(B, Hkv, n_r, D)``, ``(B, Hkv, n_r, Dv)``, this rank's keys and values.
        group: the process group over which the sequence is sharded (default: the whole world).
        causal, window, scale, alibi_slopes: as :func:`longkernels.memory_attention` (M = 0), over
            absolute positions of the whole sequence.
        return_lse: also return the float32 LSE ``(B, H, n_r)`` (float64 for float64).
        mem_k, mem_v: ``(B, Hkv, M, D | Dv)`` Transformer-XL memory, the same on every rank, before the
            sequence (memory at positions ``0 .. M - 1``, the sequence at ``M .. M + T - 1``): the result is
            then single-process ``memory_attention(q, k, v, mem_k, mem_v)``'s rows. Their gradient on each
            rank is that rank's queries' part (sum it over the group if the memory is trained through).

    Returns:
        This rank's rows of single-process ``memory_attention`` over the whole sequence, whatever ``W``;
        differentiable in q, k and v (the backward is a ring too). Every rank must call it together.
    """
    g, W, r = _group_rank(group)
    window_i, scale_f, alibi = _validate_local("ring_attention", q, k, v, causal, window, scale, alibi_slopes)
    M = _validate_memory(q, k, v, mem_k, mem_v)
    lay = _check_group("ring_attention", q, k, v, causal, window_i, scale_f, alibi, g, W, extra=(M,),
                       extra_names=("memory length",))
    if lay.T == 0:
        raise ValueError("ring_attention: the sequence is empty on every rank")
    if window_i >= M + lay.T:
        window_i = 0  # hides nothing
    cfg = _RingConfig(g, W, r, _plan(lay, causal, window_i), causal, window_i, scale_f, M)
    if M == 0:
        mem_k = mem_v = None
    tensors = (q, k, v) + ((mem_k, mem_v) if M else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, lse = _RingAttention.apply(q, k, v, mem_k, mem_v, alibi, cfg)
    else:
        out, lse = _ring_forward(cfg, q, k, v, mem_k, mem_v, alibi, _block_ops(q, v)[0])
    return (out, lse) if return_lse else out


def _validate_memory(q, k, v, mem_k, mem_v) -> int:
    if mem_k is None and mem_v is None:
        return 0
    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together (both tensors or both None)")
    for name, t, like in (("mem_k", mem_k, k), ("mem_v", mem_v, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[:2] != like.shape[:2] or t.shape[3] != like.shape[3]:
            raise ValueError(f"{name} must have shape (B={like.shape[0]}, Hkv={like.shape[1]}, M, "
                             f"{like.shape[3]}), got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must have q's dtype and device ({q.dtype}, {q.device}), got {t.dtype}, "
                             f"{t.device}")
    if mem_k.shape[2] != mem_v.shape[2]:
        raise ValueError(f"mem_k and mem_v must hold the same number of tokens, got {mem_k.shape[2]} and "
                         f"{mem_v.shape[2]}")
    return mem_k.shape[2]


def gather_tail(x: torch.Tensor, n: int, group=None, *, dim: int = 2) -> torch.Tensor:
    """The last ``n`` positions of the sharded sequence along ``dim``, in order, on every rank (what a
    Transformer-XL layer keeps as the next segment's memory); only those rows travel."""
    g, W, r = _group_rank(group)
    dim = _dim(dim, x)
    rows = _exchange_meta([x.shape[dim]], g, W)
    lay = zigzag_layout(sum(m[0] for m in rows), W)
    n = min(check_int("n", n, minimum=0), lay.T)
    lo = lay.T - n
    pos = [lay.positions(s) for s in range(W)]
    keep = [torch.nonzero(p >= lo).flatten() for p in pos]
    mine = x.index_select(dim, keep[r].to(x.device))
    parts = _all_to_all_p2p([mine] * W, [_with_dim(x.shape, dim, len(kp)) for kp in keep], x.dtype, x.device, g,
                            W, r)
    out = x.new_empty(_with_dim(x.shape, dim, n))
    for s, part in enumerate(parts):
        out.index_copy_(dim, (pos[s][keep[s]] - lo).to(x.device), part)
    return out


# --------------------------------------------------------------------------------------------
# Ulysses: all-to-all over heads
# --------------------------------------------------------------------------------------------
class _Exchange(torch.autograd.Function):
    """``to_heads``: (B, h_all, n_r, d) sequence-sharded -> (B, h_all / W, T, d) head-sharded in natural order;
    else the way back. Each is the other's backward."""

    @staticmethod
    def forward(ctx, x, to_heads, g, W, r, lay):
        ctx.args = (to_heads, g, W, r, lay)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, g, W, r, lay)

    @staticmethod
    def backward(ctx, grad):
        to_heads, g, W, r, lay = ctx.args
        return (_heads_to_seq if to_heads else _seq_to_heads)(grad.contiguous(), g, W, r, lay), None, None, None, \
            None, None


def _seq_to_heads(x, g, W, r, lay):
    B, h_all, n, d = x.shape
    hs = h_all // W
    sends = [x[:, j * hs:(j + 1) * hs] for j in range(W)]
    parts = _all_to_all_p2p(sends, [(B, hs, lay.local_length(s), d) for s in range(W)], x.dtype, x.device, g, W, r)
    full = x.new_empty(B, hs, lay.T, d)
    for s, part in enumerate(parts):
        off = 0
        for c in lay.chunks(s):
            full[:, :, lay.start(c): lay.start(c) + lay.length(c)] = part[:, :, off: off + lay.length(c)]
            off += lay.length(c)
    return full


def _heads_to_seq(x, g, W, r, lay):
    B, hs, T, d = x.shape
    sends = [torch.cat([x[:, :, lay.start(c): lay.start(c) + lay.length(c)] for c in lay.chunks(j)], dim=2)
             for j in range(W)]
    parts = _all_to_all_p2p(sends, [(B, hs, lay.local_length(r), d)] * W, x.dtype, x.device, g, W, r)
    return torch.cat(parts, dim=1)


def _validate_relative_group(fn, q, mem_k, causal, window, alibi, T, pos_emb, content_bias, pos_bias):
    """memory_attention's relative-position checks against the whole sequence (T rows), before any message."""
    B, H, _, D = q.shape
    shape_q = q.new_empty(1).expand(B, H, T, D)  # the gathered queries' shape, nothing allocated
    mem = mem_k if mem_k is not None else q.new_empty(1).expand(B, 1, 0, D)
    try:
        _ma.validate_relative(shape_q, mem, causal, window, alibi, (), pos_emb, content_bias, pos_bias)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None


def ulysses_attention(q, k, v, *, group=None, causal=True, window=None, scale=None, alibi_slopes=None,
                      return_lse=False, mem_k=None, mem_v=None, pos_emb=None, content_bias=None, pos_bias=None):
    """:func:`ring_attention`'s contract by two all-to-alls over heads (DeepSpeed-Ulysses): each rank gathers
    the whole sequence for ``H / W`` of the heads, runs :func:`longkernels.memory_attention` on it, and sends
    the rows back. ``H`` must be divisible by ``W``; key/value heads are split too when ``Hkv`` is, else
    repeated to ``H`` first (each rank then receives its query heads' key/value heads).

    ``mem_k, mem_v`` (the same on every rank, as :func:`ring_attention`'s) and Transformer-XL relative
    positions ``pos_emb`` ``(H, P, D)``, ``content_bias``, ``pos_bias`` ``(H, D)`` (the same on every rank,
    :func:`longkernels.memory_attention`'s meaning over the whole sequence) are sliced to each rank's heads: the
    fused relative kernels then see the whole sequence, so this is the context-parallel path for relative
    positions. Their gradients on each rank are that rank's heads' part (zero elsewhere): sum them over the
    group, as for the parameters of a model trained on it."""
    g, W, r = _group_rank(group)
    window_i, scale_f, alibi = _validate_local("ulysses_attention", q, k, v, causal, window, scale, alibi_slopes)
    M = _validate_memory(q, k, v, mem_k, mem_v)
    relative = pos_emb is not None or content_bias is not None or pos_bias is not None
    rel_meta, rel_names = [], []
    for name, t, n in (("pos_emb", pos_emb, 3), ("content_bias", content_bias, 2), ("pos_bias", pos_bias, 2)):
        dims = list(t.shape) if isinstance(t, torch.Tensor) else [-1 if t is None else -2]  # -1: None
        rel_meta += (dims + [-3] * n)[:n]
        rel_names += [f"{name}'s dim {i} (-1: not given)" for i in range(n)]
    lay = _check_group("ulysses_attention", q, k, v, causal, window_i, scale_f, alibi, g, W,
                       extra=(M, *rel_meta), extra_names=("memory length", *rel_names))
    H, Hkv = q.shape[1], k.shape[1]
    if H % W != 0:
        raise ValueError(f"ulysses_attention: the query heads (H={H}) must be divisible by the group size "
                         f"({W}); use ring_attention for this shape")
    if lay.T == 0:
        raise ValueError("ulysses_attention: the sequence is empty on every rank")
    if relative:
        _validate_relative_group("ulysses_attention", q, mem_k if M else None, causal, window_i, alibi, lay.T,
                                 pos_emb, content_bias, pos_bias)
    if M == 0:
        mem_k = mem_v = None
    if Hkv % W != 0:
        k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        if mem_k is not None:
            mem_k, mem_v = (t.repeat_interleave(H // Hkv, dim=1) for t in (mem_k, mem_v))
    qf = _Exchange.apply(q, True, g, W, r, lay)
    kf = _Exchange.apply(k, True, g, W, r, lay)
    vf = _Exchange.apply(v, True, g, W, r, lay)
    hs, hkv = H // W, k.shape[1] // W
    heads = slice(r * hs, (r + 1) * hs)
    slopes = None if alibi_slopes is None else alibi_slopes[heads]
    mem = {}
    if mem_k is not None:
        mem = dict(mem_k=mem_k[:, r * hkv:(r + 1) * hkv], mem_v=mem_v[:, r * hkv:(r + 1) * hkv])
    rel = {name: t[heads] for name, t in (("pos_emb", pos_emb), ("content_bias", content_bias),
                                           ("pos_bias", pos_bias)) if t is not None}
    out, lse = _ma.memory_attention(qf, kf, vf, causal=causal, window=window_i or None, scale=scale_f,
                                    alibi_slopes=slopes, return_lse=True, **mem, **rel)
    out = _Exchange.apply(out, False, g, W, r, lay)
    if not return_lse:
        return out
    lse = _Exchange.apply(lse.unsqueeze(-1).contiguous(), False, g, W, r, lay).squeeze(-1)
    return out, lse
