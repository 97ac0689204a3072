"""Greedy generation with a Hugging Face model on longkernels' attention, against HF's own sdpa.

Builds a Llama-like model from a config (no download; random weights: the tokens mean nothing, the speed
and the agreement do), prefills a prompt and generates, once with ``attn_implementation="longkernels"`` and
once with ``"sdpa"`` (HF's default), and prints the prefill and decode rates and whether both produced the
same tokens. ``longkernels.hf.stats()`` shows that no call fell back to HF.

    python examples/hf_generate.py --quick                 # a small model and prompt: seconds
    python examples/hf_generate.py --prompt 8192 --new 32  # the benchmark's model, a long prompt
"""
from __future__ import annotations

import argparse
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, a 512-token prompt, 16 new tokens")
    p.add_argument("--prompt", type=int, default=4096, help="prompt length in tokens (default 4096)")
    p.add_argument("--new", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--batch", type=int, default=1, help="sequences generated together (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--impls", default="longkernels,sdpa", help="attention implementations to run, in order")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt")
    args = p.parse_args(argv)
    if args.quick:
        args.prompt, args.new = 512, 16
    for name in ("prompt", "new", "batch", "layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def build(args):
    import transformers
    if args.quick:
        config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688,
                                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=args.prompt + args.new)
    else:
        config = transformers.LlamaConfig(vocab_size=1024, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                                          max_position_embeddings=args.prompt + args.new)
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()


def run(model, impl, ids, new):
    """(prefill seconds, decode seconds, tokens) of one greedy generation under ``impl``."""
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)  # the prompt alone: prefill time
        t1 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return prefill, max(t2 - t1 - prefill, 1e-9), out


def main(argv=None) -> int:
    args = parse_args(argv)
    import longkernels.hf as lkhf  # registers "longkernels"
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    model = build(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), generator=g)
    print(f"llama-like model: hidden {model.config.hidden_size}, {model.config.num_hidden_layers} layers, "
          f"{model.config.num_attention_heads}/{model.config.num_key_value_heads} heads, {args.dtype}; "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens", flush=True)
    results = {}
    for i, impl in enumerate(impls):
        print(f"[{i + 1}/{len(impls)}] {impl} ...", flush=True)
        lkhf.reset_stats()
        prefill, decode, out = run(model, impl, ids, args.new)
        results[impl] = (prefill, decode, out)
        print(f"    prefill {args.batch * args.prompt / prefill:9.1f} tok/s   decode "
              f"{args.batch * args.new / decode:7.2f} tok/s", flush=True)
        if impl == "longkernels":
            print(f"    longkernels.hf.stats(): {lkhf.stats()}", flush=True)
    if len(results) > 1:
        first, *rest = impls
        for other in rest:
            same = torch.equal(results[first][2], results[other][2])
            print(f"{first} vs {other}: prefill {results[other][0] / results[first][0]:.2f}x, decode "
                  f"{results[other][1] / results[first][1]:.2f}x faster; same tokens: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
