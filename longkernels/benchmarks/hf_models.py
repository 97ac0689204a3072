"""Hugging Face models end to end: ``attn_implementation="longkernels"`` against HF's ``sdpa`` (its default) and
``eager``, and Reformer's LSH layer patched against HF's own (``longkernels bench --variants hf``).

* A Llama-like model built from a config (hidden 2048, 16 heads, 4 kv heads, head dim 128, 2 layers, a
  1024-token vocabulary so that the embedding does not dominate): prefill (one forward over the prompt),
  decode (one ``generate`` step: a forward of one token over a dynamic cache of the given length, the cache
  grown by that token as generate grows it, then cropped back), and a training step (loss and backward).
  Reported as tokens per second beside the time.
* Reformer with HF's default configuration (hidden 256, 12 heads of 64, chunks of 64 attending to their own
  and the previous chunk, one hash, HF's choice of ``num_buckets``: factorised from 16k on), one
  ``LSHSelfAttention`` layer, forward and forward+backward, patched (``longkernels.hf.enable``) against
  unpatched: layer against layer. Its two projections are timed alone too (``projections``): with the matrix
  products' count of the layer, that bounds what any attention kernel can give the layer on the machine
  (``reformer_bound_vs_hf`` in the summary).

Not part of the default ``longkernels bench`` run (each step runs a whole model): ask for it with
``--variants hf`` or ``--ops hf_models``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Sequence

import torch

from .base import Implementation, Operation, Sweep, dtype_name

LLAMA = dict(vocab_size=1024, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=65536)
# HF's default ReformerConfig as far as the layer's matrix products go (checked against the config when built).
REFORMER = dict(hidden_size=256, num_attention_heads=12, attention_head_size=64, lsh_attn_chunk_length=64,
                lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_hashes=1)
# eager materialises (B, H, Lq, Lk) float scores (and their softmax): beyond this many bytes it is skipped.
EAGER_BYTES_LIMIT = 6 * 2**30


@dataclasses.dataclass(frozen=True)
class HFCase:
    kind: str  # "llama" or "reformer"
    phase: str  # llama: "prefill", "decode", "train"; reformer: "layer"
    length: int  # prompt, cache or sequence length
    dtype: torch.dtype
    mode: str
    batch: int = 1
    op: str = "hf_models"
    variant: str = "hf"
    sweep_name: str = "tokens"

    @property
    def sweep(self) -> int:
        return self.length

    @property
    def id(self) -> str:
        return f"hf_models-{self.kind}-{self.phase}-{self.mode}-{dtype_name(self.dtype)}-L{self.length}"

    @property
    def shape(self) -> str:
        if self.kind == "llama":
            what = {"prefill": "prompt", "decode": "1 query over a cache of", "train": "sequence"}[self.phase]
            return f"llama-like H16/4 D128 2 layers, B{self.batch}, {what} {self.length}"
        return f"reformer LSHSelfAttention (HF default config), B{self.batch}, L{self.length}"

    @property
    def tokens(self) -> int:
        """Tokens one step processes (decode: one per sequence)."""
        return self.batch if self.phase == "decode" else self.batch * self.length

    def flops(self) -> Optional[float]:
        return None  # a whole model: time and tokens per second are reported

    def make_inputs(self, device, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "reformer":
            x = torch.randn(self.batch, self.length, 256, generator=g).to(device=device, dtype=self.dtype)
            return {"hidden_states": x.requires_grad_(self.mode == "fwdbwd")}
        if self.phase == "decode":
            hd = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
            shape = (self.batch, LLAMA["num_key_value_heads"], self.length, hd)
            cache = [torch.randn(shape, generator=g).to(device=device, dtype=self.dtype)
                     for _ in range(2 * LLAMA["num_hidden_layers"])]
            ids = torch.randint(0, LLAMA["vocab_size"], (self.batch, 1), generator=g).to(device)
            return {"input_ids": ids, "cache": cache}
        return {"input_ids": torch.randint(0, LLAMA["vocab_size"], (self.batch, self.length), generator=g).to(device)}


def hf_cases(lengths: Sequence[int], dtypes: Sequence[torch.dtype], modes: Sequence[str], variants: Sequence[str],
             decode: Sequence[int] = (), train: Sequence[int] = (), reformer: Sequence[int] = ()) -> list:
    """Prefill at ``lengths``, decode over caches of ``decode``, training at ``train`` (float32 and bfloat16 as
    asked), Reformer's layer at ``reformer`` (float32)."""
    if "hf" not in variants:
        return []
    cases = []
    for dtype in dtypes:
        if "fwd" in modes:
            cases += [HFCase("llama", "prefill", n, dtype, "fwd") for n in lengths]
            cases += [HFCase("llama", "decode", n, dtype, "fwd") for n in decode]
        if "fwdbwd" in modes:
            cases += [HFCase("llama", "train", n, dtype, "fwdbwd") for n in train]
    for mode in modes:
        cases += [HFCase("reformer", "layer", n, torch.float32, mode) for n in reformer]
    return cases


def _transformers_reasons() -> list[str]:
    try:
        import transformers  # noqa: F401
        import longkernels.hf  # noqa: F401
    except ImportError as exc:
        return [f"transformers is not installed ({exc}): pip install longkernels[hf]"]
    return []


_MODELS: dict = {}


def _llama(dtype, device):
    """The benchmark's Llama-like model (one random init, cached; each implementation gets a copy)."""
    key = (dtype, str(device))
    if key not in _MODELS:
        import transformers
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**LLAMA)
        _MODELS.clear()  # one model at a time: they are large
        _MODELS[key] = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return _MODELS[key]


class HFModel(Implementation):
    """The Llama-like model under one attention implementation; Reformer's layer patched or not."""

    def __init__(self, name: str, attn: str, peer: bool, note: str):
        self.name, self.attn, self.peer, self.note = name, attn, peer, note
        self.comparable = attn != "projections"  # computes part of the layer, not its output

    def reasons(self, case, device):
        reasons = _transformers_reasons()
        if self.attn == "projections" and case.kind != "reformer":
            reasons.append("the shared projections are timed for Reformer's layer only")
        if case.kind == "reformer" and self.attn not in ("longkernels", "hf", "projections"):
            reasons.append("Reformer's layer is compared patched against unpatched (longkernels, hf)")
        if case.kind == "llama" and self.attn == "hf":
            reasons.append("the llama-like model is compared across attention implementations")
        if case.kind == "llama" and self.attn == "eager":
            keys = case.length + (1 if case.phase == "decode" else 0)
            queries = 1 if case.phase == "decode" else case.length
            scores = case.batch * LLAMA["num_attention_heads"] * queries * keys * 4 * 3
            if scores > EAGER_BYTES_LIMIT:
                reasons.append(f"eager would materialise {scores / 2**30:.0f} GiB of scores")
        return reasons

    def build(self, case, device):
        if case.kind == "reformer":
            return self._reformer(case, device)
        import transformers
        model = copy.deepcopy(_llama(case.dtype, device))
        model.set_attn_implementation(self.attn)
        if case.phase == "train":
            model.train()

            def train(input_ids):
                return model(input_ids=input_ids, labels=input_ids).loss
            train.zero_grad = model.zero_grad
            return train
        model.requires_grad_(False)
        if case.phase == "prefill":
            def prefill(input_ids):
                with torch.inference_mode():
                    return model(input_ids=input_ids, use_cache=False).logits
            return prefill

        def decode(input_ids, cache):
            # generate's step: the cache as it stands, this token appended to it, the logits of the next.
            dyn = transformers.DynamicCache()
            for layer in range(LLAMA["num_hidden_layers"]):
                dyn.update(cache[2 * layer], cache[2 * layer + 1], layer)
            with torch.inference_mode():
                return model(input_ids=input_ids, past_key_values=dyn, use_cache=True).logits
        return decode

    def _reformer(self, case, device):
        import transformers
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
        import longkernels.hf as lkhf
        config = transformers.ReformerConfig(max_position_embeddings=case.length, axial_pos_embds=False)
        drift = {k: (getattr(config, k), v) for k, v in REFORMER.items() if getattr(config, k) != v}
        if drift:
            raise RuntimeError(f"HF's default ReformerConfig changed ({drift}): update REFORMER in {__name__}")
        torch.manual_seed(0)
        layer = LSHSelfAttention(config, layer_idx=0).to(device=device, dtype=case.dtype)
        layer.train(case.mode == "fwdbwd")
        if self.attn == "projections":
            # What both layers run alike, the query/key and value projections (their backward too): HF's layer
            # time over this one bounds the ratio any attention kernel can give the layer.
            layer.requires_grad_(case.mode == "fwdbwd")

            def projections(hidden_states):
                return layer.query_key(hidden_states), layer.value(hidden_states)
            projections.zero_grad = layer.zero_grad
            return projections
        holder = torch.nn.ModuleList([layer])
        if self.attn == "longkernels":
            lkhf.enable(holder)
        layer.requires_grad_(case.mode == "fwdbwd")

        def fn(hidden_states):
            torch.manual_seed(1)  # the same rotations for both
            return layer(hidden_states).hidden_states
        fn.zero_grad = layer.zero_grad
        return fn


def summarize(records: list, device) -> Optional[dict]:
    """Tokens per second for every implementation, and the ratios of longkernels to sdpa (Llama) and to HF's
    layer (Reformer), with the issue's targets."""
    rows, llama_ratios, reformer = {}, [], {}
    by_case: dict = {}
    for r in records:
        if r.get("status") == "ok":
            by_case.setdefault(r["case"], {})[r["impl"]] = r
    for case_id, impls in by_case.items():
        ours = impls.get("longkernels")
        if ours is None:
            continue
        tokens = _tokens(case_id)
        kind, phase = case_id.split("-")[1:3]
        row = {"mode": ours["mode"], "phase": f"{kind} {phase}", "dtype": ours["dtype"],
               "tokens_per_s": {impl: tokens / (r["median_ms"] / 1e3) for impl, r in impls.items()},
               "label": f"{kind} {phase} {ours['mode']} {ours['dtype']} L{_length(case_id)}"}
        peer = "sdpa" if "sdpa" in impls else "hf" if "hf" in impls else None
        if peer == "hf" and "projections" in impls:
            hf_ms, proj_ms = impls["hf"]["median_ms"], impls["projections"]["median_ms"]
            row["ceiling_vs_hf"] = hf_ms / proj_ms
            proj, attn = reformer_flops(_length(case_id), ours["mode"])
            row["bound_vs_hf"] = hf_ms / (proj_ms * (proj + attn) / proj)
            row["projections_flop_per_s"] = proj / (proj_ms / 1e3)
            row["attention_flops"] = attn
        if peer:
            # the drawing's key: the peer's time over ours (HF's default sdpa; HF's own layer for Reformer)
            row["ratio_vs_sdpa"] = impls[peer]["median_ms"] / ours["median_ms"]
            row["vs"] = peer
            (llama_ratios if peer == "sdpa" else reformer.setdefault(case_id, [])).append(row["ratio_vs_sdpa"])
        rows[case_id] = row
    if not rows:
        return None
    out = {"implementation": "longkernels", "rows": rows,
           "ratio_label": "HF's time / longkernels' (llama-like: sdpa; Reformer: HF's own layer)"}
    heads = []
    ref = [r for rs in reformer.values() for r in rs]
    if ref:
        heads.append(f"Reformer layer vs HF's {min(ref):.2f}x to {max(ref):.2f}x")
    if llama_ratios:
        heads.insert(0, f"llama-like vs sdpa {min(llama_ratios):.2f}x to {max(llama_ratios):.2f}x")
        out["llama_min_vs_sdpa"] = min(llama_ratios)
        long_points = [rows[c]["ratio_vs_sdpa"] for c in rows if "llama" in c and rows[c].get("vs") == "sdpa"
                       and _length(c) >= 8192]
        out["targets_met"] = {"llama-like: at least as fast as sdpa everywhere": min(llama_ratios) >= 1.0}
        if long_points:
            out["targets_met"]["llama-like: >= 1.3x sdpa at 8k and more"] = min(long_points) >= 1.3
    fb = [rows[c]["ratio_vs_sdpa"] for c in rows if "reformer" in c and "fwdbwd" in c and _length(c) == 16384]
    if fb:
        out.setdefault("targets_met", {})["reformer L=16384 fwd+bwd >= 4x HF's layer"] = min(fb) >= 4.0
    ceilings = {c: rows[c]["ceiling_vs_hf"] for c in rows if "ceiling_vs_hf" in rows[c]}
    if ceilings:
        out["reformer_ceiling_vs_hf"] = ceilings
        out["ceiling_label"] = ("HF's layer time / its query-key and value projections' (which both layers run "
                                "alike): the most any attention kernel could give the layer if attention were free")
        out["reformer_bound_vs_hf"] = {c: rows[c]["bound_vs_hf"] for c in ceilings}
        out["bound_label"] = ("HF's layer time / the time of the layer's matrix products (projections, then the "
                              "attention's QK^T and PV, and in the backward dP, dV, dQ, dK without recomputing S) at "
                              "the rate the projections reach in this run: the most any attention kernel can give "
                              "the layer on this machine")
        bound = [out["reformer_bound_vs_hf"][c] for c in ceilings if "fwdbwd" in c and _length(c) == 16384]
        if bound:
            heads.append(f"Reformer bound at 16k fwd+bwd on this machine {min(bound):.2f}x")
    out["headline"] = "; ".join(heads)
    return out


def reformer_flops(length: int, mode: str) -> tuple[float, float]:
    """Matrix-product FLOPs of one Reformer layer (HF's default config, batch 1): its query/key and value
    projections, and the attention's QK^T and PV over each token's window of chunks; forward+backward adds the
    projections' dX and dW and the attention's dP, dV, dQ, dK (S kept from the forward: the least work)."""
    r = REFORMER
    width = r["num_attention_heads"] * r["attention_head_size"]
    proj = 2 * 2 * length * r["hidden_size"] * width
    keys = (r["lsh_num_chunks_before"] + 1 + r["lsh_num_chunks_after"]) * r["lsh_attn_chunk_length"]
    attn = 2 * 2 * length * r["num_hashes"] * keys * width
    return (3 * proj, 3 * attn) if mode == "fwdbwd" else (proj, attn)


def _length(case_id: str) -> int:
    return int(case_id.rsplit("-L", 1)[1])


def _tokens(case_id: str) -> int:
    return 1 if "-decode-" in case_id else _length(case_id)  # batch 1 throughout


OPERATION = Operation(
    name="hf_models",
    make_cases=hf_cases,
    implementations=(HFModel("longkernels", "longkernels", False, 'attn_implementation="longkernels"'),
                     HFModel("sdpa", "sdpa", True, "HF's default (torch SDPA)"),
                     HFModel("eager", "eager", True, "HF's eager attention"),
                     HFModel("hf", "hf", True, "HF's own LSHSelfAttention"),
                     HFModel("projections", "projections", False,
                             "Reformer's two projections alone (not attention): the layer's floor")),
    variants=("hf",),
    sweeps={"quick": Sweep((256,), dtypes=("float32",), extra={"decode": (1024,), "train": (256,),
                                                                "reformer": (4096,)}),
            "default": Sweep((2048,), dtypes=("float32",), extra={"decode": (4096,), "train": (1024,),
                                                                   "reformer": (16384,)}),
            "full": Sweep((2048, 4096, 8192, 16384), dtypes=("float32", "bfloat16"),
                          extra={"decode": (4096, 8192, 16384, 32768), "train": (2048, 4096, 8192),
                                 "reformer": (16384, 32768, 65536)})},
    flops_note="whole models: time and tokens per second (no FLOP count)",
    summarize=summarize,
    opt_in=True,
)
