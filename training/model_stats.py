"""Held-out statistics of a trained MoE checkpoint.

Loads a stock mlx-lm checkpoint (``mlx_lm.load``) and the held-out tokens
written by ``prepare_data.py`` and reports:

  * held-out loss (nats/token) and perplexity
  * the unigram baseline: add-one smoothed train-set unigram scored on the
    same held-out targets
  * per routed layer: expert-load entropy normalised to 0..1
    (H(load) / log(num_experts); 1 = perfectly uniform), min/max expert
    share relative to uniform, and the mean overlap |A ∩ B| / k of the
    expert sets A, B chosen for consecutive tokens. As a reference the same
    overlap is computed between tokens at the same position in different
    held-out windows ("unrelated"); k / num_experts is the overlap of
    uniformly random sets.

Usage:
  python training/model_stats.py artifacts/tiny-qwen2-moe-mlx \\
      --data artifacts/data --json artifacts/tiny-qwen2-moe-mlx/stats.json
"""

import argparse
import math
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def multi_hot(inds, n_experts):
    b, l, k = inds.shape
    mh = np.zeros((b, l, n_experts), dtype=np.float32)
    np.put_along_axis(mh, inds.astype(np.int64), 1.0, axis=-1)
    return mh


def main():
    ap = argparse.ArgumentParser(description="Held-out stats of an MoE checkpoint.")
    ap.add_argument("model")
    ap.add_argument("--data", default="artifacts/data")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--json", default=None, help="output path (default MODEL/stats.json)")
    args = ap.parse_args()

    import mlx_lm

    model, _ = mlx_lm.load(args.model)
    common.install_router_recorders(model)
    margs = model.args
    n_experts = common.num_routed_experts(margs)
    top_k = margs.num_experts_per_tok
    layers = [i for i, _ in common.moe_blocks(model)]

    heldout = common.load_tokens(args.data, "heldout")
    train = common.load_tokens(args.data, "train")
    windows = common.eval_windows(heldout, args.context, args.max_windows)
    unigram = common.unigram_baseline(train, windows[:, 1:], margs.vocab_size)

    loads = np.zeros((len(layers), n_experts))
    ov_sum = np.zeros(len(layers))
    ov_n = 0
    ref_sum = np.zeros(len(layers))
    ref_n = 0
    total, count = 0.0, 0
    for s in range(0, len(windows), args.batch_size):
        common.ROUTER_LOG.clear()
        w = mx.array(windows[s : s + args.batch_size])
        logits = model(w[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, w[:, 1:], reduction="sum").item()
        count += w[:, 1:].size
        routed = common.router_outputs(top_k)
        common.ROUTER_LOG.clear()
        for li, (_, inds) in enumerate(routed):
            inds = np.array(inds)
            loads[li] += np.bincount(inds.reshape(-1), minlength=n_experts)
            mh = multi_hot(inds, n_experts)
            ov_sum[li] += ((mh[:, :-1] * mh[:, 1:]).sum(-1) / top_k).sum()
            if mh.shape[0] > 1:
                ref_sum[li] += ((mh * np.roll(mh, 1, axis=0)).sum(-1) / top_k).sum()
        ov_n += mh.shape[0] * (mh.shape[1] - 1)
        if mh.shape[0] > 1:
            ref_n += mh.shape[0] * mh.shape[1]

    loss = total / count
    per_layer = []
    for li, layer in enumerate(layers):
        p = loads[li] / loads[li].sum()
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum() / math.log(n_experts))
        per_layer.append(
            {
                "layer": layer,
                "load_entropy_norm": ent,
                "max_share_x_uniform": float(p.max() * n_experts),
                "min_share_x_uniform": float(p.min() * n_experts),
                "unused_experts": int((loads[li] == 0).sum()),
                "consecutive_overlap": float(ov_sum[li] / ov_n),
                "unrelated_overlap": float(ref_sum[li] / max(ref_n, 1)),
            }
        )

    res = {
        "model": os.path.abspath(args.model),
        "model_type": margs.model_type,
        "num_experts": n_experts,
        "top_k": top_k,
        "heldout_eval_tokens": count,
        "heldout_loss": loss,
        "heldout_ppl": math.exp(loss),
        "unigram_baseline_loss": unigram,
        "unigram_ppl": math.exp(unigram),
        "random_set_overlap": top_k / n_experts,
        "layers": per_layer,
        "mean_load_entropy_norm": float(np.mean([r["load_entropy_norm"] for r in per_layer])),
        "mean_consecutive_overlap": float(np.mean([r["consecutive_overlap"] for r in per_layer])),
    }

    print(f"{args.model} ({margs.model_type}, {n_experts} experts, top-{top_k})")
    print(
        f"held-out loss {loss:.4f} nats (ppl {math.exp(loss):.1f}) over {count} tokens; "
        f"unigram baseline {unigram:.4f} (ppl {math.exp(unigram):.1f})"
    )
    print(
        f"{'layer':>5} {'entropy':>8} {'max/unif':>9} {'min/unif':>9} {'unused':>6} "
        f"{'overlap':>8} {'unrelated':>9}"
    )
    for r in per_layer:
        print(
            f"{r['layer']:>5} {r['load_entropy_norm']:>8.3f} {r['max_share_x_uniform']:>9.2f} "
            f"{r['min_share_x_uniform']:>9.2f} {r['unused_experts']:>6d} "
            f"{r['consecutive_overlap']:>8.3f} {r['unrelated_overlap']:>9.3f}"
        )
    print(f"random-set overlap k/E = {top_k / n_experts:.3f}")

    out = args.json or os.path.join(args.model, "stats.json")
    common.save_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
