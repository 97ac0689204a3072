"""Every registered op checks what its memory safety depends on (docs/decisions.md, "Op checks").

The ops (``torch.ops.longkernels.*``: the C++ CPU kernels, and the Python-defined Triton and torch ops) are
public surface, called by torch.compile graphs, exported programs and users. Each test here starts from a
valid call (which must run: the mutations are then the only thing wrong), changes one argument to something
inconsistent and expects a ``RuntimeError`` from the op's own checks, before anything is read. Then every op
runs on inputs that are views into NaN-filled buffers: a kernel reading past a view would bring a NaN into
its outputs, and none may appear.
"""
from __future__ import annotations

import pytest
import torch

from longkernels import _ext
from longkernels.ops import dispatch
import longkernels.ops.lsh_attention  # noqa: F401  (registers the Python-defined ops)
import longkernels.ops.memory_attention  # noqa: F401
import longkernels.ops.reversible_coupling  # noqa: F401
from longkernels.testing import case_seed

ops = torch.ops.longkernels
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.LOAD_ERROR}")
needs_triton = pytest.mark.skipif(bool(dispatch.triton_reasons("cpu")),
                                  reason="; ".join(dispatch.triton_reasons("cpu")) or "triton available")

B, H, HKV, N, M, D, DV = 2, 4, 2, 20, 13, 16, 12
L, C, NH, NB = 24, 8, 2, 4


def _gen(name):
    return torch.Generator().manual_seed(case_seed(name))


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# --------------------------------------------------------------------------------------------
# Valid argument sets and their mutations
# --------------------------------------------------------------------------------------------
def mem_fwd_args(g=None):
    g = g or _gen("mem fwd")
    q, k, v = _rand(g, B, H, N, D), _rand(g, B, HKV, N, D), _rand(g, B, HKV, N, DV)
    mk, mv = _rand(g, B, HKV, M, D), _rand(g, B, HKV, M, DV)
    slopes = torch.rand(H, generator=g)
    return dict(q=q, k=k, v=v, mem_k=mk, mem_v=mv, alibi_slopes=slopes, causal=True, window=9, scale=D ** -0.5)


def mem_bwd_args():
    g = _gen("mem bwd")
    a = mem_fwd_args(g)
    dout = _rand(g, B, H, N, DV)
    return dict(dout=dout, **{k: a[k] for k in ("q", "k", "v", "mem_k", "mem_v", "alibi_slopes")},
                lse=_rand(g, B, H, N) + 3.0, delta=_rand(g, B, H, N), causal=True, window=9, scale=D ** -0.5)


def rel_fwd_args(g=None):
    g = g or _gen("rel fwd")
    q, k, v = _rand(g, B, H, N, D), _rand(g, B, HKV, N, D), _rand(g, B, HKV, N, D)
    mk, mv = _rand(g, B, HKV, M, D), _rand(g, B, HKV, M, D)
    return dict(q=q, q_pos=_rand(g, B, H, N, D), k=k, v=v, mem_k=mk, mem_v=mv, pos_emb=_rand(g, H, 9, D), causal=True,
                window=9, scale=D ** -0.5)


def rel_bwd_args():
    g = _gen("rel bwd")
    a = rel_fwd_args(g)
    return dict(dout=_rand(g, B, H, N, D), **{k: a[k] for k in ("q", "q_pos", "k", "v", "mem_k", "mem_v", "pos_emb")},
                lse=_rand(g, B, H, N) + 3.0, delta=_rand(g, B, H, N), causal=True, window=9, scale=D ** -0.5)


REL_FWD_BAD = {
    "k shorter than q": ("k", lambda a: a["k"][:, :, :-1]),
    "mem_v shorter than mem_k": ("mem_v", lambda a: a["mem_v"][:, :, :-1]),
    "q_pos shorter than q": ("q_pos", lambda a: a["q_pos"][:, :, :-1]),
    "q_pos dtype": ("q_pos", lambda a: a["q_pos"].double()),
    "pos_emb heads": ("pos_emb", lambda a: a["pos_emb"][:-1]),
    "pos_emb head dim": ("pos_emb", lambda a: a["pos_emb"][..., :-1]),
    "pos_emb too short for the window": ("pos_emb", lambda a: a["pos_emb"][:, :-1]),
    "pos_emb too short without a window": ("window", lambda a: 0),
    "not causal": ("causal", lambda a: False),
    "H % Hkv != 0": ("k", lambda a: torch.randn(B, 3, N, D)),
}
REL_BWD_BAD = {
    **REL_FWD_BAD,
    "lse shorter": ("lse", lambda a: a["lse"][:, :, :-1]),
    "delta shorter": ("delta", lambda a: a["delta"][:, :-1]),
}

MEM_FWD_BAD = {
    "k shorter than q": ("k", lambda a: a["k"][:, :, :-1]),
    "v shorter than q": ("v", lambda a: a["v"][:, :, :-3]),
    "mem_v shorter than mem_k": ("mem_v", lambda a: a["mem_v"][:, :, :-1]),
    "mem_k longer than mem_v": ("mem_k", lambda a: torch.cat([a["mem_k"], a["mem_k"]], 2)),
    "mem_k head dim": ("mem_k", lambda a: a["mem_k"][..., :-1]),
    "v batch": ("v", lambda a: a["v"][:1]),
    "v kv heads": ("v", lambda a: a["v"][:, :1]),
    "H % Hkv != 0": ("k", lambda a: torch.randn(B, 3, N, D)),
    "Hkv = 0": ("k", lambda a: torch.randn(B, 0, N, D)),
    "k dtype": ("k", lambda a: a["k"].double()),
    "q 3-D": ("q", lambda a: a["q"][0]),
    "q integer": ("q", lambda a: a["q"].int()),
    "alibi shorter": ("alibi_slopes", lambda a: a["alibi_slopes"][:-1]),
    "alibi 2-D": ("alibi_slopes", lambda a: a["alibi_slopes"][None]),
    "alibi integer": ("alibi_slopes", lambda a: a["alibi_slopes"].int()),
    "window < 0": ("window", lambda a: -1),
}
MEM_BWD_BAD = {
    **MEM_FWD_BAD,
    "lse shorter": ("lse", lambda a: a["lse"][:, :, :-1]),
    "lse 2-D": ("lse", lambda a: a["lse"][0]),
    "delta shorter": ("delta", lambda a: a["delta"][:, :-1]),
    "dout head dim": ("dout", lambda a: a["dout"][..., :-1]),
    "dout shorter": ("dout", lambda a: a["dout"][:, :, 1:]),
}


def lsh_perm(g, Lp=L):
    return torch.stack([torch.randperm(Lp, generator=g) for _ in range(B * H * NH)]).view(B, H, NH, Lp).int()


def lsh_fwd_args(g=None):
    g = g or _gen("lsh fwd")
    mask = torch.rand(B, L, generator=g) < 0.2
    return dict(qk=_rand(g, B, H, L, D), v=_rand(g, B, H, L, DV), perm=lsh_perm(g), key_padding_mask=mask,
                chunk_size=C, n_chunks_before=1, n_chunks_after=1, causal=True, scale=1.0)


def lsh_bwd_args():
    g = _gen("lsh bwd")
    a = lsh_fwd_args(g)
    return dict(dout=_rand(g, B, H, L, DV), **{k: a[k] for k in ("qk", "v", "perm", "key_padding_mask")},
                lse_max=_rand(g, B, H, L), lse_log=_rand(g, B, H, L).abs(), out=_rand(g, B, H, L, DV),
                dlse=_rand(g, B, H, L), chunk_size=C, n_chunks_before=1, n_chunks_after=1, causal=True, scale=1.0)


def _perm_with(a, index, value):
    p = a["perm"].clone()
    p[index] = value
    return p


def _perm_duplicate(a):
    p = a["perm"].clone()
    p[1, 2, 1, 5] = p[1, 2, 1, 6]
    return p


LSH_FWD_BAD = {
    "perm entry -1": ("perm", lambda a: _perm_with(a, (0, 1, 0, 3), -1)),
    "perm entry >= padded length": ("perm", lambda a: _perm_with(a, (1, 0, 1, 0), L)),
    "perm entry far out": ("perm", lambda a: _perm_with(a, (1, 3, 0, 7), 2**30)),
    "perm duplicate entries": ("perm", _perm_duplicate),
    "perm int64": ("perm", lambda a: a["perm"].long()),
    "perm batch": ("perm", lambda a: a["perm"][:1]),
    "padded length < L": ("perm", lambda a: torch.stack([torch.randperm(16) for _ in range(B * H * NH)])
                          .view(B, H, NH, 16).int()),
    "v shorter than qk": ("v", lambda a: a["v"][:, :, :-2]),
    "v heads": ("v", lambda a: a["v"][:, :2]),
    "v dtype": ("v", lambda a: a["v"].double()),
    "chunk_size 0": ("chunk_size", lambda a: 0),
    "chunk_size not dividing the padded length": ("chunk_size", lambda a: 5),
    "n_chunks_before < 0": ("n_chunks_before", lambda a: -1),
    "n_chunks_after huge": ("n_chunks_after", lambda a: 2**40),
    "mask shape": ("key_padding_mask", lambda a: a["key_padding_mask"][:, :-1]),
    "mask dtype": ("key_padding_mask", lambda a: a["key_padding_mask"].float()),
    "qk 3-D": ("qk", lambda a: a["qk"][0]),
}
LSH_BWD_BAD = {
    **LSH_FWD_BAD,
    "lse_max shorter": ("lse_max", lambda a: a["lse_max"][:, :, :-1]),
    "lse_log heads": ("lse_log", lambda a: a["lse_log"][:, :1]),
    "dout shorter": ("dout", lambda a: a["dout"][:, :, :-1]),
    "out head dim": ("out", lambda a: a["out"][..., :-1]),
    "dlse shorter": ("dlse", lambda a: a["dlse"][:, :, 1:]),
}


def hash_args():
    g = _gen("hash")
    return dict(qk=_rand(g, B, H, L, D), rotations=_rand(g, H, D, NH, NB // 2),
                key_padding_mask=torch.rand(B, L, generator=g) < 0.2, n_buckets=NB, padded_len=L)


HASH_BAD = {
    "n_buckets 0": ("n_buckets", lambda a: 0),
    "n_buckets odd": ("n_buckets", lambda a: 5),
    "n_buckets not matching rotations": ("n_buckets", lambda a: 8),
    "rotations heads": ("rotations", lambda a: a["rotations"][:1]),
    "rotations head dim": ("rotations", lambda a: a["rotations"][:, :-1]),
    "mask shape": ("key_padding_mask", lambda a: a["key_padding_mask"][:, :-1]),
    "mask transposed": ("key_padding_mask", lambda a: torch.zeros(L, B, dtype=torch.bool)),
    "mask dtype": ("key_padding_mask", lambda a: a["key_padding_mask"].float()),
    "padded_len < L": ("padded_len", lambda a: L - 1),
    "padded_len beyond int32": ("padded_len", lambda a: 2**31),
    "qk 3-D": ("qk", lambda a: a["qk"][0]),
}


def coupling_args():
    g = _gen("coupling")
    return dict(y=_rand(g, 6, 40), fy=_rand(g, 6, 40, dtype=torch.bfloat16), dy=_rand(g, 6, 40), dgrad=_rand(g, 6, 40))


COUPLING_BAD = {
    "fy shape": ("fy", lambda a: a["fy"][:, :-1]),
    "dgrad shape": ("dgrad", lambda a: a["dgrad"].t()),
    "bfloat16 stream": ("y", lambda a: a["y"].bfloat16()),
    "dy dtype": ("dy", lambda a: a["dy"].double()),
    "dgrad integer": ("dgrad", lambda a: a["dgrad"].int()),
}
COUPLING_INPLACE_BAD = {
    **COUPLING_BAD,
    "dy is y": ("dy", lambda a: a["y"]),
    "dy overlaps dgrad": ("dy", lambda a: a["dgrad"]),
    "dy expanded": ("dy", lambda a: torch.randn(1, 40).expand(6, 40)),
}


OPS = {  # name: (op, valid arguments, mutations, needs)
    "memory_attention_fwd": (lambda: ops.memory_attention_fwd, mem_fwd_args, MEM_FWD_BAD, needs_ext),
    "memory_attention_bwd": (lambda: ops.memory_attention_bwd, mem_bwd_args, MEM_BWD_BAD, needs_ext),
    "lsh_hash_sort": (lambda: ops.lsh_hash_sort, hash_args, HASH_BAD, needs_ext),
    "lsh_attention_fwd": (lambda: ops.lsh_attention_fwd, lsh_fwd_args, LSH_FWD_BAD, needs_ext),
    "lsh_attention_bwd": (lambda: ops.lsh_attention_bwd, lsh_bwd_args, LSH_BWD_BAD, needs_ext),
    "memory_attention_rel_fwd": (lambda: ops.memory_attention_rel_fwd, rel_fwd_args, REL_FWD_BAD, needs_ext),
    "memory_attention_rel_bwd": (lambda: ops.memory_attention_rel_bwd, rel_bwd_args, REL_BWD_BAD, needs_ext),
    "reversible_coupling": (lambda: ops.reversible_coupling, coupling_args, COUPLING_BAD, needs_ext),
    "reversible_coupling_": (lambda: ops.reversible_coupling_, coupling_args, COUPLING_INPLACE_BAD, needs_ext),
    "memory_attention_fwd_triton": (lambda: ops.memory_attention_fwd_triton, mem_fwd_args, MEM_FWD_BAD,
                                    needs_triton),
    "memory_attention_bwd_triton": (lambda: ops.memory_attention_bwd_triton, mem_bwd_args, MEM_BWD_BAD,
                                    needs_triton),
    "memory_attention_rel_fwd_triton": (lambda: ops.memory_attention_rel_fwd_triton, rel_fwd_args, REL_FWD_BAD,
                                        needs_triton),
    "memory_attention_rel_bwd_triton": (lambda: ops.memory_attention_rel_bwd_triton, rel_bwd_args, REL_BWD_BAD,
                                        needs_triton),
    "lsh_hash_sort_torch": (lambda: ops.lsh_hash_sort_torch, hash_args, HASH_BAD, None),
    "lsh_attention_fwd_triton": (lambda: ops.lsh_attention_fwd_triton, lsh_fwd_args, LSH_FWD_BAD, needs_triton),
    "lsh_attention_bwd_triton": (lambda: ops.lsh_attention_bwd_triton, lsh_bwd_args, LSH_BWD_BAD, needs_triton),
    "reversible_coupling_triton": (lambda: ops.reversible_coupling_triton, coupling_args, COUPLING_BAD,
                                   needs_triton),
    "reversible_coupling_triton_": (lambda: ops.reversible_coupling_triton_, coupling_args, COUPLING_INPLACE_BAD,
                                    needs_triton),
}
PARAMS = [pytest.param(name, what, marks=[needs] if needs else [], id=f"{name}-{what}")
          for name, (_, _, bad, needs) in OPS.items() for what in bad]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[v[3]] if v[3] else []) for n, v in OPS.items()])
def test_valid_call_runs(name):
    op, make, _, _ = OPS[name]
    op()(**make())


@pytest.mark.parametrize("name,what", PARAMS)
def test_inconsistent_argument_is_a_runtime_error(name, what):
    op, make, bad, _ = OPS[name]
    args = make()
    key, mutate = bad[what]
    args[key] = mutate(args)
    # The op's own check names it (not an error from deeper inside, after something was read).
    with pytest.raises(RuntimeError, match=name.removesuffix("_triton").removesuffix("_triton_").rstrip("_")):
        op()(**args)


# --------------------------------------------------------------------------------------------
# Nothing is read past an input: views into NaN-filled buffers
# --------------------------------------------------------------------------------------------
def nan_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view of a larger NaN-filled buffer: a margin around every dimension and the
    last two dimensions swapped in memory, so the view is non-contiguous and NaN lies past each edge."""
    if t.dim() >= 2:
        shape = [n + 2 for n in t.shape]
        shape[-1], shape[-2] = shape[-2], shape[-1]
        buf = torch.full(shape, float("nan"), dtype=t.dtype).transpose(-1, -2)
    else:
        buf = torch.full([n + 2 for n in t.shape], float("nan"), dtype=t.dtype)
    view = buf[tuple(slice(1, 1 + n) for n in t.shape)]
    view.copy_(t)
    return view


def _no_nan(out) -> None:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for i, o in enumerate(outs):
        assert not torch.isnan(o.float()).any(), f"output {i} holds a NaN: something was read past an input"


def _mem_views(backend_suffix: str):
    fwd = getattr(ops, "memory_attention_fwd" + backend_suffix)
    bwd = getattr(ops, "memory_attention_bwd" + backend_suffix)
    a = mem_fwd_args()
    views = {k: nan_view(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    out, lse = fwd(**views)
    _no_nan((out, lse))
    g = _gen("mem views")
    dout = nan_view(_rand(g, *out.shape))
    delta = nan_view((dout * out).sum(-1))
    grads = bwd(dout, *(views[k] for k in ("q", "k", "v", "mem_k", "mem_v", "alibi_slopes")), nan_view(lse), delta,
                True, 9, D ** -0.5)
    _no_nan(grads)


def _rel_views(suffix: str):
    a = {k: nan_view(v) if isinstance(v, torch.Tensor) else v for k, v in rel_fwd_args().items()}
    out, lse = getattr(ops, "memory_attention_rel_fwd" + suffix)(**a)
    _no_nan((out, lse))
    dout = nan_view(_rand(_gen("rel views"), *out.shape))
    grads = getattr(ops, "memory_attention_rel_bwd" + suffix)(dout, *(a[k] for k in ("q", "q_pos", "k", "v", "mem_k", "mem_v", "pos_emb")),
                                         nan_view(lse), nan_view((dout * out).sum(-1)), True, 9, D ** -0.5)
    _no_nan(grads)


def _lsh_views(hash_op, suffix: str):
    a = hash_args()
    views = {k: nan_view(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in a.items()}
    _, perm = hash_op(**views)
    f = lsh_fwd_args()
    qk, v = nan_view(f["qk"]), nan_view(f["v"])
    out, lse_max, lse_log = getattr(ops, "lsh_attention_fwd" + suffix)(qk, v, perm, views["key_padding_mask"], C, 1, 1,
                                                                        True, 1.0)
    _no_nan((out, lse_max, lse_log))
    g = _gen("lsh views")
    dout, dlse = nan_view(_rand(g, *out.shape)), nan_view(_rand(g, B, H, L))
    grads = getattr(ops, "lsh_attention_bwd" + suffix)(dout, qk, v, perm, views["key_padding_mask"], nan_view(lse_max),
                                                       nan_view(lse_log), nan_view(out), dlse, C, 1, 1, True, 1.0)
    _no_nan(grads)


def _coupling_views(name: str):
    a = {k: nan_view(v) for k, v in coupling_args().items()}
    _no_nan(getattr(ops, name)(**a))
    if name.endswith("_"):
        _no_nan(a["dy"])


@needs_ext
def test_cpu_ops_read_nothing_past_their_inputs():
    _mem_views("")
    _rel_views("")
    _lsh_views(ops.lsh_hash_sort, "")
    _lsh_views(ops.lsh_hash_sort_torch, "")
    _coupling_views("reversible_coupling")
    _coupling_views("reversible_coupling_")


@needs_triton
def test_triton_ops_read_nothing_past_their_inputs():
    _mem_views("_triton")
    _rel_views("_triton")
    _lsh_views(ops.lsh_hash_sort_torch, "_triton")
    _coupling_views("reversible_coupling_triton")
    _coupling_views("reversible_coupling_triton_")


# --------------------------------------------------------------------------------------------
# The same on CUDA tensors (the CUDA kernels' checks and the Triton ops on the GPU); the CPU tests above
# are their twins
# --------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine); the CPU tests "
                                                     "above run the same checks on the C++ and interpreter paths")
CUDA_OPS = ["lsh_hash_sort_torch", "lsh_attention_fwd_triton", "lsh_attention_bwd_triton", "memory_attention_fwd_triton",
            "memory_attention_bwd_triton", "memory_attention_rel_fwd_triton", "memory_attention_rel_bwd_triton",
            "reversible_coupling_triton", "reversible_coupling_triton_"]
if _ext.cuda_compiled():
    CUDA_OPS += ["memory_attention_fwd", "memory_attention_bwd", "lsh_hash_sort"]


def _cuda(args):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_ops_check_their_arguments(name):
    op, make, bad, _ = OPS[name]
    op()(**_cuda(make()))  # the valid call runs
    for what, (key, mutate) in bad.items():
        args = _cuda(make())
        args[key] = mutate(args)
        if isinstance(args[key], torch.Tensor):
            args[key] = args[key].cuda()
        with pytest.raises(RuntimeError):
            op()(**args)
        torch.cuda.synchronize()  # nothing was launched that could fault later


@pytest.mark.gpu
@needs_cuda
def test_cuda_ops_read_nothing_past_their_inputs():
    # .cuda() of a view copies it densely: the NaN-padded buffers are made on the GPU.
    def gpu_nan_view(t):
        shape = [n + 2 for n in t.shape]
        buf = torch.full(shape, float("nan"), dtype=t.dtype, device="cuda")
        view = buf[tuple(slice(1, 1 + n) for n in t.shape)]
        view.copy_(t)
        return view

    a = {k: gpu_nan_view(v) if isinstance(v, torch.Tensor) else v for k, v in mem_fwd_args().items()}
    suffixes = ["_triton"] + ([""] if _ext.cuda_compiled() else [])
    for suffix in suffixes:
        out, lse = getattr(ops, "memory_attention_fwd" + suffix)(**a)
        _no_nan((out, lse))
    h = {k: gpu_nan_view(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else
         (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in hash_args().items()}
    _, perm = (ops.lsh_hash_sort if _ext.cuda_compiled() else ops.lsh_hash_sort_torch)(**h)
    f = lsh_fwd_args()
    out, lse_max, lse_log = ops.lsh_attention_fwd_triton(gpu_nan_view(f["qk"]), gpu_nan_view(f["v"]), perm,
                                                         h["key_padding_mask"], C, 1, 1, True, 1.0)
    _no_nan((out, lse_max, lse_log))
    c = {k: gpu_nan_view(v) for k, v in coupling_args().items()}
    _no_nan(ops.reversible_coupling_triton(**c))
