"""``longkernels.hf.enable`` on HF's Reformer: our LSH kernel under each ``LSHSelfAttention``, HF's results.

Tiny models from configs (no download). float64 models match the unpatched model to round-off (HF's LSH
layer is exact in float64; in float32 it loses about three digits on rows whose only visible key is the
token itself, so float32 is held to the low-precision rule against HF in float64 instead). Rotations are
drawn with HF's RNG calls: the same logits under the same torch seed, the same generator state after.
Training runs through HF's own reversible layers, whose backward replays the forward's buckets.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install .[hf]")

import longkernels.hf as lkhf  # noqa: E402
from hf_stats import fresh_stats, no_fallback  # noqa: E402,F401  (the fixture applies to every test here)
from longkernels.testing import LOWP_FACTOR, LOWP_FLOOR, rel_err  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*loss_type=None.*")


def _config(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                attn_layers=["lsh", "local", "lsh"], feed_forward_size=64, lsh_attn_chunk_length=16,
                local_attn_chunk_length=16, num_hashes=2, is_decoder=True, axial_pos_embds=False,
                max_position_embeddings=1024, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                local_attention_probs_dropout_prob=0.0, hash_seed=11, num_buckets=[2, 4], pad_token_id=0,
                eos_token_id=1)
    base.update(kw)
    return transformers.ReformerConfig(**base)


def _pair(config, cls=None, dtype=torch.float64):
    """An unpatched model and a patched copy with the same weights."""
    cls = cls or transformers.ReformerModelWithLMHead
    torch.manual_seed(0)
    theirs = cls(config).to(dtype).eval()
    ours = lkhf.enable(copy.deepcopy(theirs))
    return ours, theirs




CONFIGS = {
    "factorised": dict(num_buckets=[2, 4]),
    "int-buckets": dict(num_buckets=8, num_hashes=3),
    "hf-default-buckets": dict(num_buckets=None),  # HF chooses; factorised at L = 512 (limit 32)
    "encoder": dict(is_decoder=False, num_buckets=[4, 2]),
    "look-ahead": dict(lsh_num_chunks_before=1, lsh_num_chunks_after=1, is_decoder=False),
    "no-hash-seed": dict(hash_seed=None),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", [False, True])
def test_eval_logits_match_hf_float64(name, padding):
    L = 512 if name == "hf-default-buckets" else 64
    config = _config(**CONFIGS[name])
    cls = transformers.ReformerForMaskedLM if not config.is_decoder else None
    ours, theirs = _pair(config, cls)
    ids = torch.randint(2, 64, (2, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding:
        mask[1, L - 13:] = 0
    got, want = [], []
    for model, out in ((ours, got), (theirs, want)):
        torch.manual_seed(5)  # the rotations' draw when hash_seed is None
        with torch.no_grad():
            out.append(model(input_ids=ids, attention_mask=mask).logits)
        out.append(torch.get_rng_state())
    keep = mask.bool()
    assert rel_err(got[0][keep], want[0][keep]) <= 1e-10
    assert torch.equal(got[1], want[1]), "the patched layers consumed the RNG differently from HF's"
    if name == "hf-default-buckets":
        assert ours.config.num_buckets == [8, 8] == theirs.config.num_buckets  # HF's factorised choice, saved
    no_fallback()


def test_float32_meets_the_low_precision_rule_against_hf_float64():
    config = _config()
    ours, theirs = _pair(config, dtype=torch.float32)
    truth = copy.deepcopy(theirs).double()
    ids = torch.randint(2, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, hf32, hf64 = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, truth(input_ids=ids).logits
    allowed = LOWP_FACTOR * rel_err(hf32, hf64) + LOWP_FLOOR[torch.float32]
    assert rel_err(got, hf64) <= allowed


@pytest.mark.parametrize("name", ["factorised", "int-buckets", "encoder"])
def test_training_gradients_through_hf_reversible_layers(name):
    config = _config(**CONFIGS[name])
    cls = transformers.ReformerForMaskedLM if not config.is_decoder else None
    ours, theirs = _pair(config, cls)
    ids = torch.randint(2, 64, (2, 64), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for (name_, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) <= 1e-9, name_
    no_fallback()


def test_short_sequences_take_hfs_standard_attention():
    # L <= chunk length: HF attends over everything without hashing (and without drawing rotations).
    ours, theirs = _pair(_config(hash_seed=None))
    ids = torch.randint(2, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    state = torch.get_rng_state()
    torch.manual_seed(0)
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    assert rel_err(got, want) <= 1e-10 and torch.equal(state, torch.get_rng_state())
    no_fallback()


def test_num_hashes_override_and_buckets_returned():
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention
    config = _config()
    torch.manual_seed(0)
    layer = LSHSelfAttention(config, layer_idx=0).double().eval()
    patched = copy.deepcopy(layer)
    holder = torch.nn.ModuleList([patched])
    lkhf.enable(holder)
    x = torch.randn(2, 64, 32, dtype=torch.float64)
    want = layer(x, num_hashes=3)
    got = patched(x, num_hashes=3)
    assert torch.equal(got.buckets, want.buckets) and got.buckets.shape == (2, 2, 3, 64)
    assert rel_err(got.hidden_states, want.hidden_states) <= 1e-10
    # Given buckets (what HF's reversible backward passes) are used as they are: no hashing.
    replay = patched(x, num_hashes=3, buckets=want.buckets)
    assert rel_err(replay.hidden_states, want.hidden_states) <= 1e-10


def test_state_dict_unchanged_and_disable_restores():
    ours, theirs = _pair(_config())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    lkhf.disable(ours)
    layers = [m for m in ours.modules() if type(m).__name__ == "LSHSelfAttention"]
    assert layers and all("forward" not in vars(m) for m in layers)


def test_incremental_decoding_falls_back_and_matches():
    ours, theirs = _pair(_config())
    ids = torch.randint(2, 64, (1, 32), generator=torch.Generator().manual_seed(6))
    outs = []
    for model in (ours, theirs):
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, num_hashes=2))
    assert torch.equal(outs[0], outs[1])
    assert any("past_buckets_states" in r for r in lkhf.stats()["fallbacks"])


def test_output_attentions_falls_back():
    ours, theirs = _pair(_config())
    ids = torch.randint(2, 64, (1, 64), generator=torch.Generator().manual_seed(8))
    with pytest.warns(lkhf.HFFallbackWarning, match="output_attentions"):
        with torch.no_grad():
            out = ours(input_ids=ids, output_attentions=True)
    assert out.attentions is not None
