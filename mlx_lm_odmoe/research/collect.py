"""``mlx_lm_odmoe.collect``: record routing traces of a model.

    mlx_lm_odmoe.collect MODEL --out traces.npz --heldout heldout.npy

Runs MODEL through the plugin (every expert resident) on teacher-forced
chunks of held-out tokens and on sampled continuations of held-out prompts,
and writes every MoE layer's block input and router top-k (see traces.py).
"""

import argparse
import sys
import time

import numpy as np


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.collect",
        description="Record per-layer MoE block inputs and router top-k on held-out and generated text.",
    )
    p.add_argument("model", help="model folder (odmoe or stock mlx-lm MoE checkpoint)")
    p.add_argument("--out", required=True, help="output .npz trace file")
    p.add_argument(
        "--heldout",
        help="held-out token ids (.npy, 1-D); random tokens if omitted (smoke tests only)",
    )
    p.add_argument(
        "--chunks", type=int, default=32, help="teacher-forced held-out chunks (default 32)"
    )
    p.add_argument(
        "--chunk-len", type=int, default=256, help="tokens per teacher-forced chunk (default 256)"
    )
    p.add_argument("--generate", type=int, default=16, help="sampled continuations (default 16)")
    p.add_argument(
        "--prompt-len",
        type=int,
        default=64,
        help="held-out prompt tokens per continuation (default 64)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=192,
        help="tokens generated per continuation (default 192)",
    )
    p.add_argument("--temp", type=float, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import OdmoeError
    from ..loading import resolve_model_path

    heldout = read_heldout(parser, args) if args.heldout else None
    try:
        model_path = resolve_model_path(args.model)
        return run(args, model_path, heldout)
    except OdmoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def read_heldout(parser, args) -> np.ndarray:
    """--heldout's tokens, checked against what the pieces asked for need
    before the model is loaded; argparse's usage error otherwise (exit 2)."""
    try:
        heldout = np.load(args.heldout)
    except (OSError, ValueError) as e:
        parser.error(f"--heldout {args.heldout}: cannot read it as a .npy array ({e})")
    if heldout.ndim != 1 or not np.issubdtype(heldout.dtype, np.integer):
        parser.error(
            f"--heldout {args.heldout}: expected a 1-D array of token ids, "
            f"got {heldout.dtype} of shape {heldout.shape}"
        )
    n, pieces = len(heldout), args.chunks + args.generate
    lengths = {"--chunk-len": args.chunk_len, "--prompt-len": args.prompt_len}
    piece = max(lengths.values())
    if n < pieces * piece:
        longest = " and ".join(k for k, v in lengths.items() if v == piece)
        fit = n // pieces
        fixes = []
        if n >= piece:
            fixes.append(f"lower --chunks + --generate to at most {n // piece} pieces")
        if fit:
            too_long = " and ".join(k for k, v in lengths.items() if v > fit)
            fixes.append(f"lower {too_long} to at most {fit}")
        parser.error(
            f"--heldout {args.heldout} has {n} tokens, too few for --chunks {args.chunks} + "
            f"--generate {args.generate} = {pieces} pieces of {piece} tokens ({longest}): "
            f"{pieces * piece} needed; {', '.join(fixes + ['or give more held-out tokens'])}"
        )
    return heldout


def run(args, model_path, heldout=None):
    import mlx_lm_odmoe

    from .traces import collect

    model, _ = mlx_lm_odmoe.load(model_path, expert_cache="100%")
    if heldout is None:
        vocab = model.model.embed_tokens.weight.shape[0]
        n = (args.chunks + args.generate) * max(args.chunk_len, args.prompt_len)
        heldout = np.random.default_rng(args.seed).integers(0, vocab, n)
    t0 = time.perf_counter()
    trace = collect(
        model,
        heldout,
        chunks=args.chunks,
        chunk_len=args.chunk_len,
        generate=args.generate,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        temp=args.temp,
        batch=args.batch,
        seed=args.seed,
        progress=not args.quiet,
    )
    trace.source = str(args.model)
    trace.save(args.out)
    n, g = len(trace.tokens), int(trace.generated.sum())
    print(
        f"{args.out}: {n} tokens ({n - g} held-out, {g} generated) x {len(trace.moe_layers)} MoE layers, "
        f"top-{trace.top_k} of {trace.num_experts} experts, {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
