"""``mlx_lm_odmoe.eval_predictors``: how well each predictor finds the experts.

    mlx_lm_odmoe.eval_predictors MODEL --traces traces.npz [--also legal=legal.npz]
                                 [--json] [--plot out.png]

Scores every predictor (router lookahead, previous token, most frequent and,
when MODEL has one, the shadow model, adapting online and frozen) on the
evaluation sequences of the trace: recall of the true top-k at distances
1..d, at widths k and 2k. ``--also`` scores the same predictors on traces of
other text (say, a kind the shadow model was not trained on) beside it:
a predictor that is better only on text like its training text is not
better (research/cross_domain.py trains without each kind in turn).
"""

import argparse
import json
import time

from .traces import Trace, eval_mask


def predictors_for(model, model_dir, trace: Trace, distance: int, shadow_dir=None, split=None):
    """The baselines plus the shadow model when one is saved. ``split`` (a
    token mask) restricts the most-frequent counts to training tokens of the
    kind being evaluated: held-out text and generated text use different
    experts."""
    from ..predict import load_predictor
    from ..predict.baselines import MostFrequent, PreviousToken, RouterLookahead

    layers = trace.moe_layers
    out = [
        RouterLookahead(model, layers, distance),
        PreviousToken(layers, trace.num_experts, distance),
        MostFrequent.fit(
            trace, distance, mask=~eval_mask(trace) & (True if split is None else split)
        ),
    ]
    shadow = load_predictor(model, shadow_dir or model_dir)
    if shadow is not None:
        shadow.distance = min(shadow.distance, distance)
        out.append(shadow)
        if shadow.online:
            from ..predict.shadow import ShadowModel

            frozen = ShadowModel(model, shadow.net, online=False)
            frozen.name, frozen.distance = "shadow-frozen", shadow.distance
            out.append(frozen)
    return out


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.eval_predictors",
        description="Recall of the true top-k experts at 1..d layers ahead for every expert predictor.",
    )
    p.add_argument(
        "model", help="model folder the traces came from (its shadow model is used if present)"
    )
    p.add_argument("--traces", required=True, help="trace file (.npz) from mlx_lm_odmoe.collect")
    p.add_argument("--distance", type=int, default=4, help="largest distance to score (default 4)")
    p.add_argument(
        "--split",
        choices=("generated", "heldout"),
        default="generated",
        help="score generated tokens (default) or teacher-forced held-out text",
    )
    p.add_argument(
        "--shadow", help="folder with shadow.safetensors/shadow.json (default: the model folder)"
    )
    p.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=TRACES",
        help="also score on these traces (say, text the shadow model was not trained on)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--plot", help="write a PNG of recall vs distance here")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    also = dict(a.split("=", 1) for a in args.also if "=" in a)
    if len(also) != len(args.also):
        parser.error("--also takes NAME=TRACES")
    import mlx_lm_odmoe

    from .evaluate import evaluate, markdown_table, plot, time_per_token

    model, _ = mlx_lm_odmoe.load(args.model, expert_cache="min")
    trace = Trace.load(args.traces)
    want = trace.generated if args.split == "generated" else ~trace.generated
    predictors = predictors_for(model, args.model, trace, args.distance, args.shadow, want)
    held = eval_mask(trace)
    trace, positions = trace.select(held), want[held]
    t0 = time.perf_counter()
    results = evaluate(predictors, trace, positions)
    for p in predictors:
        results[p.name]["ms_per_token"] = 1e3 * time_per_token(p, trace)
    other = {}
    for name, path in also.items():
        o = Trace.load(path)
        o_want = o.generated if args.split == "generated" else ~o.generated
        o_held = eval_mask(o)
        o_pos = o_want[o_held]
        other[name] = {
            "traces": path,
            "tokens": int(o_pos.sum()),
            "predictors": evaluate(predictors, o.select(o_held), o_pos),
        }
    report = {
        "model": str(args.model),
        "traces": str(args.traces),
        "split": args.split,
        "tokens": int(positions.sum()),
        "top_k": trace.top_k,
        "num_experts": trace.num_experts,
        "predictors": results,
        "also": other,
    }
    if args.plot:
        plot(
            results,
            trace.top_k,
            args.plot,
            f"{args.model.rstrip('/').split('/')[-1]}: {args.split} text",
        )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"{report['tokens']} {args.split} tokens, top-{trace.top_k} of {trace.num_experts} experts "
            f"({time.perf_counter() - t0:.1f} s)\n"
        )
        print(markdown_table(results, trace.top_k))
        print(
            "\npredictor time per decode token (all MoE layers, median): "
            + ", ".join(f"{n} {r['ms_per_token']:.3f} ms" for n, r in results.items())
        )
        for name, o in other.items():
            print(f"\n{name} ({o['traces']}): {o['tokens']} {args.split} tokens\n")
            print(markdown_table(o["predictors"], trace.top_k))


if __name__ == "__main__":
    main()
