"""``attn_implementation="longkernels"`` against HF's own attention, on tiny models built from configs.

Follows HF's own tests (the modules are not in the PyPI package, so these are ours): the eager-vs-sdpa
inference test (batches with left and right padding, with and without a mask, float32 and bfloat16, logits
compared on the positions that are not padding), the flash-attention equivalence test (right padding),
greedy ``generate`` equal to eager's (dynamic cache, static cache, a prompt longer than the window, a
left-padded batch, continuing from an existing cache), training gradients of every parameter against
eager's, and Liger Kernel's convergence test (32 training steps, per-step losses equal to eager's). Every
model here runs without a single fallback (``longkernels.hf.stats()``).

Models: Llama (GQA), Mistral (sliding window everywhere), Qwen2 (full and sliding layers), Gemma 2
(softcap, sliding layers, its own query scale), GPT-OSS (sinks, sliding layers), GPT-2 (MHA), BERT (an
encoder: non-causal, padding).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra: pip install .[hf]")

import longkernels.hf as lkhf  # noqa: E402  (registers "longkernels")
from hf_stats import fresh_stats, no_fallback  # noqa: E402,F401  (the fixture applies to every test here)

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

VOCAB = 97
WINDOW = 8  # short, so that the test sequences cross it


def _config(kind: str, dtype=torch.float32):
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if kind == "llama":
        return t.LlamaConfig(num_key_value_heads=2, **common)
    if kind == "mistral":
        return t.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **common)
    if kind == "qwen2":
        return t.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
                             max_window_layers=1, **common)
    if kind == "gemma2":
        return t.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                              final_logit_softcapping=None, query_pre_attn_scalar=24, **common)
    if kind == "gpt_oss":
        # In bfloat16, both experts on every token: top-1 routing of two experts is a step function of the
        # router's logits, and a last-bit bfloat16 difference in layer 0's attention (ours and eager's equally
        # far from float32) flipped a token's expert on an AVX2 machine, moving its logits by 0.3. With top-2
        # the mixture is continuous and the comparison measures attention, not a coin toss. (float32/float64
        # keep GPT-OSS's top-1: their round-off is 2^16 times smaller, and the router's gradient stays simple.)
        top_k = 2 if dtype in (torch.bfloat16, torch.float16) else 1
        return t.GptOssConfig(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, num_local_experts=2,
                              num_experts_per_tok=top_k, layer_types=["sliding_attention", "full_attention"], **common)
    if kind == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    if kind == "bert":
        return t.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, attention_probs_dropout_prob=0.0,
                            hidden_dropout_prob=0.0)
    raise ValueError(kind)


def _model(kind: str, dtype=torch.float32, impl="longkernels", seed=0):
    torch.manual_seed(seed)
    cfg = _config(kind, dtype)
    cls = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation=impl)
    return model.to(dtype).eval()


def _twin(model, impl):
    """The same weights under another attention implementation."""
    other = type(model)(copy.deepcopy(model.config))  # its own config: the implementation lives there
    other.load_state_dict(model.state_dict())
    other.set_attn_implementation(impl)
    return other.to(next(model.parameters()).dtype).eval()


DECODERS = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss", "gpt2"]
# transformers 4.5x builds BERT's attention from a fixed {eager, sdpa} class table, not the attention
# interface: no registered implementation reaches it there (5.x moved BERT onto the interface).
_BERT_INTERFACE = int(transformers.__version__.split(".")[0]) >= 5
bert = pytest.param("bert", marks=pytest.mark.skipif(
    not _BERT_INTERFACE, reason=f"transformers {transformers.__version__}'s BERT predates the attention interface"))
ALL = DECODERS + [bert]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float64: dict(atol=1e-10, rtol=1e-9)}




def _batch(padding: str, B=3, L=21, seed=0, pads=(4, 13)):
    """Token ids and HF's 2-D mask: rows 1 and 2 padded by ``pads`` tokens on the left or right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "left":
        mask[1, :pads[0]] = 0
        mask[2, :pads[1]] = 0
    elif padding == "right":
        mask[1, L - pads[0]:] = 0
        mask[2, L - pads[1]:] = 0
    return ids, (None if padding == "none" else mask)


def _outputs(model, kind, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if kind == "bert" else out.logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# BERT batches are right-padded (its positions are absolute), decoders' both ways.
@pytest.mark.parametrize("kind, padding", [(k, p) for k in DECODERS for p in ("none", "left", "right")]
                         + [pytest.param(*bert.values, p, marks=bert.marks) for p in ("none", "right")])
def test_inference_matches_eager(kind, padding, dtype):
    model = _model(kind, dtype)
    eager = _twin(model, "eager")
    ids, mask = _batch(padding)
    got, want = _outputs(model, kind, ids, mask), _outputs(eager, kind, ids, mask)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[keep].float(), want[keep].float(), **TOL[dtype])
    no_fallback()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gpt2"])
def test_inference_matches_sdpa(kind):
    # HF's default implementation, the other reference users compare with (Gemma 2's softcap and GPT-OSS's
    # sinks have no sdpa path in HF; eager is their reference above).
    model = _model(kind)
    sdpa = _twin(model, "sdpa")
    ids, mask = _batch("left")
    keep = mask.bool()
    torch.testing.assert_close(_outputs(model, kind, ids, mask)[keep], _outputs(sdpa, kind, ids, mask)[keep],
                               **TOL[torch.float32])


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------
def _generate(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_matches_eager(kind, cache):
    model = _model(kind)
    eager = _twin(model, "eager")
    ids, _ = _batch("none", B=1, L=20)  # longer than the window: the sliding layers drop keys as it goes
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    got, want = _generate(model, ids, **kw), _generate(eager, ids, **kw)
    assert torch.equal(got, want)
    no_fallback()


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_left_padded_batch(kind):
    model = _model(kind)
    eager = _twin(model, "eager")
    ids, mask = _batch("left", L=15)
    assert torch.equal(_generate(model, ids, mask), _generate(eager, ids, mask))
    no_fallback()


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_generate_continues_an_existing_cache(kind):
    # Prefill a prompt, then continue from its cache with several new tokens at once (bottom-right alignment
    # with Lq > 1 over a longer cache), and decode on.
    model = _model(kind)
    eager = _twin(model, "eager")
    ids, _ = _batch("none", B=1, L=14)
    outs = []
    for m in (model, eager):
        with torch.no_grad():
            first = m(input_ids=ids[:, :9], use_cache=True)
            cont = m(input_ids=ids[:, 9:13], past_key_values=first.past_key_values, use_cache=True)
            # generate() from the cache: one prompt token is not in it yet
            gen = m.generate(input_ids=ids, past_key_values=cont.past_key_values, max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        outs.append((cont.logits, gen))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL[torch.float32])
    assert torch.equal(outs[0][1], outs[1][1])
    no_fallback()


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------
def _loss(model, kind, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    if kind == "bert":
        h = out.last_hidden_state
        return (h.float() ** 2 * (mask.unsqueeze(-1) if mask is not None else 1)).mean()
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("kind", ALL)
def test_training_gradients_match_eager(kind):
    # float64 weights; HF's eager softmax runs in float32 whatever the dtype, so eager is float32-exact:
    # every parameter's gradient agrees to 1e-5 in relative norm (GPT-OSS's experts need float32 matmuls).
    dtype = torch.float32 if kind == "gpt_oss" else torch.float64
    model = _model(kind, dtype).train()
    eager = _twin(model, "eager").train()
    # Padding shorter than the sliding windows: HF's eager gives NaN rows where a padded query sees nothing.
    ids, mask = _batch("right", L=19, pads=(3, 6))
    for m in (model, eager):
        _loss(m, kind, ids, mask).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        # (+1e-6: some gradients are zero in exact arithmetic, e.g. BERT's key bias, and round-off in both)
        err = ((p.grad - q.grad).norm() / (q.grad.norm() + 1e-6)).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    no_fallback()


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt_oss", bert])
def test_32_training_steps_track_eager(kind):
    # Liger Kernel's convergence test: same data, same optimizer, the per-step losses stay equal.
    losses = {}
    for impl in ("longkernels", "eager"):
        model = _model(kind, impl=impl, seed=1).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.randint(1, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0
        run = []
        for _ in range(32):  # one batch, memorised: the loss falls fast
            loss = _loss(model, kind, ids, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[impl] = torch.tensor(run)
    assert losses["eager"][-1] < losses["eager"][0]  # it trains at all
    torch.testing.assert_close(losses["longkernels"], losses["eager"], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_sequences_become_documents(kind):
    # Padding-free training: documents packed in one row, position_ids restarting per document, no mask.
    model = _model(kind)
    eager = _twin(model, "eager")
    ids = torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([list(range(7)) + list(range(9)) + list(range(4))])
    with torch.no_grad():  # no cache: HF detects packing only then
        got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        want = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
        separate = [eager(input_ids=ids[:, a:b], use_cache=False).logits for a, b in ((0, 7), (7, 16), (16, 20))]
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(got, torch.cat(separate, 1), **TOL[torch.float32])
    no_fallback()


# --------------------------------------------------------------------------------------------
# Loading, enabling, fallbacks.
# --------------------------------------------------------------------------------------------
def test_from_pretrained_and_set_attn_implementation(tmp_path):
    model = _model("llama", impl="eager")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="longkernels")
    assert loaded.config._attn_implementation == "longkernels"
    ids, mask = _batch("left")
    torch.testing.assert_close(_outputs(loaded, "llama", ids, mask)[mask.bool()],
                               _outputs(model, "llama", ids, mask)[mask.bool()], **TOL[torch.float32])
    model.set_attn_implementation("longkernels")
    assert model.config._attn_implementation == "longkernels"
    no_fallback()


def test_enable_and_disable():
    model = _model("mistral", impl="sdpa")
    assert lkhf.enable(model) is model and model.config._attn_implementation == "longkernels"
    ids, mask = _batch("left")
    _outputs(model, "mistral", ids, mask)
    no_fallback()
    lkhf.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_output_attentions_falls_back_with_a_warning_once():
    model = _model("llama")
    ids, mask = _batch("left")
    with pytest.warns(lkhf.HFFallbackWarning, match="output_attentions"):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and out.attentions[0].shape == (3, 4, 21, 21)
    s = lkhf.stats()
    assert s["longkernels"] == 0 and sum(s["fallbacks"].values()) == 2  # two layers, one warning
    eager = _twin(model, "eager")
    torch.testing.assert_close(out.logits, _outputs(eager, "llama", ids, mask))


def test_attention_dropout_in_training_falls_back():
    cfg = _config("llama")
    cfg.attention_dropout = 0.1
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="longkernels").train()
    ids, mask = _batch("none")
    with pytest.warns(lkhf.HFFallbackWarning, match="dropout"):
        model(input_ids=ids).loss if False else model(input_ids=ids, labels=ids).loss.backward()
    assert any("dropout" in r for r in lkhf.stats()["fallbacks"])
    model.eval()  # in eval the dropout is off: no fallback
    lkhf.reset_stats()
    with torch.no_grad():
        model(input_ids=ids)
    no_fallback()


def test_mask_interface_is_compact():
    # The mask handed to the attention holds (B, Lk) padding at most, never an Lq x Lk tensor.
    from transformers.masking_utils import causal_mask_function
    keep = torch.ones(2, 30, dtype=torch.bool)
    keep[1, :4] = False
    info = lkhf.mask_interface(batch_size=2, q_length=30, kv_length=30, mask_function=causal_mask_function,
                               attention_mask=keep)
    assert isinstance(info, lkhf.MaskInfo) and info.reason is None and info.causal
    assert info.padding.shape == (2, 30) and info.padding[1, :4].all() and not info.padding[0].any()
    static = lkhf.mask_interface(batch_size=1, q_length=1, kv_length=64, q_offset=9,
                                 mask_function=causal_mask_function, attention_mask=None)
    assert static.kv_used == 10  # a static cache's buffer: only its first 10 slots are keys
