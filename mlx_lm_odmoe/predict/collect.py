"""``mlx_lm_odmoe.collect``: record routing traces of a model.

    mlx_lm_odmoe.collect MODEL --out traces.npz --heldout heldout.npy

Runs MODEL through the plugin (every expert resident) on teacher-forced
chunks of held-out tokens and on sampled continuations of held-out prompts,
and writes every MoE layer's block input and router top-k (see traces.py).
"""

import argparse
import time

import numpy as np


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.collect",
        description="Record per-layer MoE block inputs and router top-k on held-out and generated text.",
    )
    p.add_argument("model", help="model folder (odmoe or stock mlx-lm MoE checkpoint)")
    p.add_argument("--out", required=True, help="output .npz trace file")
    p.add_argument("--heldout", help="held-out token ids (.npy, 1-D); random tokens if omitted (smoke tests only)")
    p.add_argument("--chunks", type=int, default=32, help="teacher-forced held-out chunks (default 32)")
    p.add_argument("--chunk-len", type=int, default=256, help="tokens per teacher-forced chunk (default 256)")
    p.add_argument("--generate", type=int, default=16, help="sampled continuations (default 16)")
    p.add_argument("--prompt-len", type=int, default=64, help="held-out prompt tokens per continuation (default 64)")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens generated per continuation (default 192)")
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import mlx_lm_odmoe
    from .traces import collect

    model, _ = mlx_lm_odmoe.load(args.model, expert_cache="100%")
    if args.heldout:
        heldout = np.load(args.heldout)
    else:
        vocab = model.model.embed_tokens.weight.shape[0]
        n = (args.chunks + args.generate) * max(args.chunk_len, args.prompt_len)
        heldout = np.random.default_rng(args.seed).integers(0, vocab, n)
    t0 = time.perf_counter()
    trace = collect(
        model, heldout, chunks=args.chunks, chunk_len=args.chunk_len, generate=args.generate,
        prompt_len=args.prompt_len, max_tokens=args.max_tokens, temp=args.temp, batch=args.batch,
        seed=args.seed, progress=not args.quiet,
    )
    trace.source = str(args.model)
    trace.save(args.out)
    n, g = len(trace.tokens), int(trace.generated.sum())
    print(f"{args.out}: {n} tokens ({n - g} held-out, {g} generated) x {len(trace.moe_layers)} MoE layers, "
          f"top-{trace.top_k} of {trace.num_experts} experts, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
