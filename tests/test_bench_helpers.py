"""Helpers of the benchmarks: the HF benchmark's summary arithmetic (longkernels/benchmarks/hf_models.py) on
made-up records (the Reformer layer's matrix-product count and the bound it puts on any attention kernel, the
ratios and the targets), and the saved-for-backward counter (longkernels/testing.py) that the engine runs on
every forward+backward case."""
import gc
import weakref

import pytest
import torch

from longkernels.benchmarks import hf_models
from longkernels.testing import saved_tensor_bytes


def test_saved_tensor_bytes_counts_and_keeps_nothing_alive():
    x = torch.randn(100, 100, requires_grad=True)
    outputs = []

    def fn(x):
        y = torch.exp(x)  # exp saves its own output: the node would hold y, whose grad_fn is the node
        outputs.append(weakref.ref(y))
        return (torch.tanh(y) * 2).sum()  # tanh saves its output too

    assert saved_tensor_bytes(fn, x, exclude=[x]) == 2 * 100 * 100 * 4
    gc.collect()
    assert outputs[0]() is None, "the forward's graph outlived the measurement"


def test_reformer_flops_count_the_layer_by_hand():
    L = 1024
    proj, attn = hf_models.reformer_flops(L, "fwd")
    # (L, 256) x (256, 768), twice; each token against 128 keys in 12 heads of 64, QK^T and PV.
    assert proj == 2 * (2 * L * 256 * 768)
    assert attn == 2 * (2 * L * 128 * 12 * 64)
    proj_fb, attn_fb = hf_models.reformer_flops(L, "fwdbwd")
    assert (proj_fb, attn_fb) == (3 * proj, 3 * attn)  # dX and dW; dP, dV, dQ, dK


def _rec(case, impl, ms, mode):
    return {"case": case, "impl": impl, "median_ms": ms, "mode": mode, "dtype": "float32", "status": "ok"}


def test_summary_bounds_the_reformer_layer_by_its_products():
    case = "hf_models-reformer-layer-fwdbwd-float32-L16384"
    proj, attn = hf_models.reformer_flops(16384, "fwdbwd")
    records = [_rec(case, "longkernels", 1200.0, "fwdbwd"), _rec(case, "hf", 3000.0, "fwdbwd"),
               _rec(case, "projections", 600.0, "fwdbwd")]
    out = hf_models.summarize(records, "cpu")
    row = out["rows"][case]
    assert row["ratio_vs_sdpa"] == pytest.approx(2.5) and row["vs"] == "hf"
    assert row["ceiling_vs_hf"] == pytest.approx(5.0)
    # The attention's products at the projections' rate: 600 ms * (proj + attn) / proj.
    assert row["bound_vs_hf"] == pytest.approx(3000.0 / (600.0 * (proj + attn) / proj))
    assert out["reformer_bound_vs_hf"][case] == row["bound_vs_hf"]
    assert out["targets_met"]["reformer L=16384 fwd+bwd >= 4x HF's layer"] is False
    assert "bound at 16k" in out["headline"]


def test_summary_llama_targets():
    rows = [_rec("hf_models-llama-prefill-fwd-float32-L8192", impl, ms, "fwd")
            for impl, ms in (("longkernels", 100.0), ("sdpa", 140.0), ("eager", 300.0))]
    rows += [_rec("hf_models-llama-decode-fwd-float32-L4096", impl, ms, "fwd")
             for impl, ms in (("longkernels", 10.0), ("sdpa", 9.0))]
    out = hf_models.summarize(rows, "cpu")
    assert out["llama_min_vs_sdpa"] == pytest.approx(0.9)
    assert out["targets_met"] == {"llama-like: at least as fast as sdpa everywhere": False,
                                  "llama-like: >= 1.3x sdpa at 8k and more": True}
    assert out["rows"]["hf_models-llama-decode-fwd-float32-L4096"]["tokens_per_s"]["longkernels"] == pytest.approx(100)
