"""Prediction and cache policy, online, on the shipped trained models.

    python benchmarks/prefetch.py [--budget 25%] [--tokens 200] [--rounds 3]

For each model, in one process and interleaved rounds, the same greedy
generation (identical tokens, since outputs are exact) runs with:
  lru            LRU, no prediction
  lfu            LFU with decay (the default policy), no prediction
  lfu+prefetch   LFU, shadow model prefetching one layer ahead (predictor
                 "on": the default "auto" leaves it off when experts come
                 from the page cache as fast as here)
  lfu+prefetch/2 the same, predicting at every other MoE layer for the next
                 two (prefetch_stride 2, prefetch_distance 2)
and reports hit rate, its lift over LRU, wasted/miss bytes, decode tok/s and
the predictor's share of decode time: the host time of its calls during the
generation (telemetry's predictor_s) over the decode time of the same run,
and its per-token cost timed alone over every MoE layer.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"
CONTENDERS = {
    "lru": {"policy": "lru", "predictor": "off"},
    "lfu": {"policy": "lfu-decay", "predictor": "off"},
    "lfu+prefetch": {"policy": "lfu-decay", "predictor": "on"},
    "lfu+prefetch/2": {
        "policy": "lfu-decay",
        "predictor": "on",
        "prefetch_stride": 2,
        "prefetch_distance": 2,
    },
}


def run(model_dir, settings, budget, tokens):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    import mlx_lm_odmoe

    os.environ.pop("MLX_LM_ODMOE_PREDICTOR", None)
    model, tok = mlx_lm_odmoe.load(model_dir, expert_cache=budget, model_config={"odmoe": settings})
    no_eos = lambda t, l: l.at[..., list(tok.eos_token_ids)].add(-1e9)  # noqa: E731
    prompt = "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n"
    last = None
    for last in mlx_lm.stream_generate(
        model, tok, prompt, max_tokens=tokens, sampler=make_sampler(0.0), logits_processors=[no_eos]
    ):
        pass
    mx.synchronize()
    s = mlx_lm_odmoe.stats(model).to_dict()
    s["tps"] = last.generation_tps
    s["decode_s"] = last.generation_tokens / last.generation_tps
    s["predictor_ms"] = predictor_ms(model) if model.expert_runtime.predictor else None
    return s


def predictor_ms(model, reps=50):
    """Per-token cost of the predictor as the block runs it: the guesses of
    every MoE layer for the prefetch distance, in numpy after the router's
    sync (small shadow models) or as MLX kernels evaluated in that sync
    (one eval per token here)."""
    import mlx.core as mx
    import numpy as np

    rt = model.expert_runtime
    layers, k = rt.store.layout.moe_layers, rt.top_k
    D = model.args.hidden_size
    x, ids = mx.random.normal((1, D)), mx.arange(k, dtype=mx.uint32)[None]

    P = rt.predictor
    host_ids = np.array(ids)

    def token():
        out = []
        for i, l in enumerate(layers):
            if P.on_host:  # after the router's sync: the input comes over, numpy does the rest
                if i % rt.prefetch_stride:
                    P.host_observe(l, host_ids)
                else:
                    P.host_guesses(
                        l, np.array(x), host_ids, rt.prefetch_distance, rt.prefetch_min_prob
                    )
            elif i % rt.prefetch_stride:
                P.observe(l, ids)
            else:
                out += P.guesses(l, x, ids, rt.prefetch_distance, rt.prefetch_min_prob).values()
        mx.eval(out)

    for _ in range(3):
        token()
    t0 = time.perf_counter()
    for _ in range(reps):
        token()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny-qwen2-moe,tiny-kimi")
    p.add_argument("--budget", default="25%")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(
        f"budget {a.budget}, {a.tokens} greedy tokens, {a.rounds} interleaved rounds (median tok/s)\n"
    )
    for name in a.models.split(","):
        folder = MODELS / name
        results = {c: [] for c in CONTENDERS}
        for _ in range(a.rounds):
            for c, settings in CONTENDERS.items():
                results[c].append(run(folder, settings, a.budget, a.tokens))
        base = results["lru"][0]
        tps = {c: statistics.median(r["tps"] for r in rs) for c, rs in results.items()}
        print(f"### {name}\n")
        print(
            "| contender | hit rate | lift over LRU (points) | misses | wasted / miss bytes | prefetch hits | decode tok/s | time vs lru |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for c, rs in results.items():
            s = rs[0]
            miss_bytes = s["misses"] * s["expert_nbytes"]
            wasted = (
                s["wasted_bytes"] / miss_bytes if miss_bytes and s["prefetched_bytes"] else None
            )
            print(
                f"| {c} | {s['hit_rate']:.3f} | {100 * (s['hit_rate'] - base['hit_rate']):+.1f} | {s['misses']} | "
                f"{'' if wasted is None else f'{wasted:.2f}'} | {s['prefetch_hits']} | {tps[c]:.1f} | "
                f"{tps['lru'] / tps[c]:.3f}x |"
            )
        print()
        for c, rs in results.items():
            if rs[0]["predictor_ms"] is None:
                continue
            pred_ms = statistics.median(r["predictor_ms"] for r in rs)
            token_ms = 1e3 / tps[c]
            share = statistics.median(r["predictor_s"] / r["decode_s"] for r in rs)
            recall = rs[0]["predictor_recall"]
            print(
                f"{c}: predictor {100 * share:.1f}% of the decode time in the same runs "
                f"({share * token_ms:.2f} of {token_ms:.1f} ms per token); timed alone "
                f"{pred_ms:.2f} ms per token; online recall of the prefetched guesses: "
                f"{recall if recall is None else f'{recall:.3f}'}"
            )
        print()


if __name__ == "__main__":
    main()
