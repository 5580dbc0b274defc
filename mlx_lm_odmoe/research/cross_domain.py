"""Cross-domain recall: shadow models trained without one kind of text.

    python -m mlx_lm_odmoe.research.cross_domain MODEL \\
        --kind code=code.npz --kind man=man.npz --kind legal=legal.npz \\
        [--json out.json] [--markdown out.md] [--save shadows/ | --load shadows/]

For each kind H, a shadow model is trained on the training sequences of
every other kind (train_shadow's recipe) and scored, next to the three
free baselines, on the evaluation sequences of H (out of domain) and of
the kinds it trained on (in domain). ``--load`` scores shadow models saved
by an earlier ``--save`` instead of training (say, with other ``--online``
settings). A shadow model that is better only
on text like its training text is not better: a user's prompts are never
the training corpus (issue 16).
"""

import argparse
import json
import sys
from pathlib import Path

from .traces import Trace, concat, eval_mask

SPLITS = ("generated", "heldout")


def predictors(model, train_trace: Trace, net, split_mask, distance: int):
    """Lookahead, previous token, most frequent (counted on the training
    kinds), the shadow model adapting online and the same one frozen."""
    from ..predict.baselines import MostFrequent, PreviousToken, RouterLookahead
    from ..predict.shadow import ShadowModel

    layers = train_trace.moe_layers
    out = [
        RouterLookahead(model, layers, distance),
        PreviousToken(layers, train_trace.num_experts, distance),
        MostFrequent.fit(train_trace, distance, mask=~eval_mask(train_trace) & split_mask),
    ]
    shadow = ShadowModel(model, net)
    shadow.distance = min(shadow.distance, distance)
    out.append(shadow)
    if shadow.online:
        frozen = ShadowModel(model, net, online=False)
        frozen.name, frozen.distance = "shadow-frozen", shadow.distance
        out.append(frozen)
    return out


def split_of(trace: Trace, split: str):
    return trace.generated if split == "generated" else ~trace.generated


def score(preds, trace: Trace, split: str):
    from .evaluate import evaluate

    held = eval_mask(trace)
    sub, positions = trace.select(held), split_of(trace, split)[held]
    # Decode starts fresh, as in the block: nothing learned from the prompt.
    results = evaluate(preds, sub, positions, fresh=True)
    return {"tokens": int(positions.sum()), "predictors": results}


def run(
    model, kinds: dict, distance=4, splits=SPLITS, save=None, load=None, log=print, **train_args
):
    """{held-out kind: {"training": info, "out_of_domain": {split: ...},
    "in_domain": {split: ...}}}; ``train_args`` go to train_shadow.train
    (with ``load``, only ``online`` is used: it replaces the saved settings)."""
    from ..predict.shadow import load_shadow, save_shadow
    from .train_shadow import train

    report = {}
    for held_out, test in kinds.items():
        others = [k for k in kinds if k != held_out]
        mixed = concat([kinds[k] for k in others])
        log(f"without {held_out}: {'loaded' if load else 'training'} on {', '.join(others)}")
        if load:
            net = load_shadow(model, Path(load) / f"without-{held_out}").net
            info = net.config.get("training", {})
            if "online" in train_args:
                net.config.pop("online", None)
                if train_args["online"]:
                    net.config["online"] = dict(train_args["online"])
        else:
            net, info = train(model, mixed, distance, log=lambda *a: None, **train_args)
        if save:
            save_shadow(net, Path(save) / f"without-{held_out}", {"training": info})
        entry = {"trained_on": others, "training": info, "out_of_domain": {}, "in_domain": {}}
        for split in splits:
            preds = predictors(model, mixed, net, split_of(mixed, split), distance)
            entry["out_of_domain"][split] = score(preds, test, split)
            entry["in_domain"][split] = score(preds, mixed, split)
            log(
                f"  {split}: "
                + summary_line(entry["out_of_domain"][split]["predictors"], test.top_k)
            )
        report[held_out] = entry
    return report


def summary_line(results, k):
    r = {n: results[n][f"recall@{k}"] for n in results}
    look, shadow = r["router-lookahead"], r["shadow"]
    return ", ".join(
        f"d={d} shadow {100 * shadow[d]:.1f} vs lookahead {100 * look[d]:.1f}" for d in sorted(look)
    )


def markdown(report: dict, top_k: int) -> str:
    """One table per split: rows (held-out kind, predictor), columns d at
    width k; the in-domain rows of the same shadow model under each kind."""
    out = []
    for split in next(iter(report.values()))["out_of_domain"]:
        out.append(f"**{split} text**, recall of the true top-{top_k} at width k (%):\n")
        first = next(iter(report.values()))["out_of_domain"][split]["predictors"]
        distances = sorted(first["router-lookahead"][f"recall@{top_k}"])
        out.append(
            "| held out | scored on | predictor | "
            + " | ".join(f"d={d}" for d in distances)
            + " | shadow - lookahead d=1 / d=4 |"
        )
        out.append("|" + "---|" * (len(distances) + 4))
        for held_out, entry in report.items():
            for where in ("out_of_domain", "in_domain"):
                block = entry[where][split]
                res = block["predictors"]
                label = held_out if where == "out_of_domain" else "+".join(entry["trained_on"])
                names = list(res) if where == "out_of_domain" else ["router-lookahead", "shadow"]
                for name in names:
                    r = res[name][f"recall@{top_k}"]
                    cells = " | ".join(f"{100 * r[d]:.1f}" for d in distances)
                    gap = ""
                    if name == "shadow":
                        look = res["router-lookahead"][f"recall@{top_k}"]
                        lo, hi = distances[0], distances[-1]
                        gap = f"{100 * (r[lo] - look[lo]):+.1f} / {100 * (r[hi] - look[hi]):+.1f}"
                    where_text = "out of domain" if where == "out_of_domain" else "in domain"
                    out.append(
                        f"| {held_out} | {label} ({where_text}, {block['tokens']} tok) | "
                        f"{name} | {cells} | {gap} |"
                    )
        out.append("")
    return "\n".join(out)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_lm_odmoe.research.cross_domain",
        description="Recall of shadow models trained without one kind of text, on that kind.",
    )
    p.add_argument("model", help="model folder the traces came from")
    p.add_argument(
        "--kind",
        action="append",
        required=True,
        metavar="NAME=TRACES",
        help="a kind of text and its trace file (.npz); at least two",
    )
    p.add_argument("--distance", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--generated-weight", type=float, default=3.0)
    p.add_argument("--correction-l2", type=float, default=None, help="default: train_shadow's")
    p.add_argument("--no-online", action="store_true", help="train frozen shadow models")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--save", help="folder for the shadow models (one per held-out kind)")
    p.add_argument("--load", help="score the shadow models an earlier --save wrote instead")
    p.add_argument(
        "--online",
        type=json.loads,
        default={},
        help="online settings over the defaults, as JSON (say '{\"pair_lr\": 0.3}')",
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write the tables here")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    kinds = dict(k.split("=", 1) for k in args.kind if "=" in k)
    if len(kinds) != len(args.kind) or len(kinds) < 2:
        parser.error("give at least two --kind NAME=TRACES")
    import mlx_lm_odmoe

    from ..predict.online import DEFAULTS
    from .train_shadow import DEFAULT_L2

    model, _ = mlx_lm_odmoe.load(args.model, expert_cache="min")
    traces = {name: Trace.load(path) for name, path in kinds.items()}
    report = run(
        model,
        traces,
        args.distance,
        args.splits,
        args.save,
        args.load,
        epochs=args.epochs,
        generated_weight=args.generated_weight,
        correction_l2=DEFAULT_L2 if args.correction_l2 is None else args.correction_l2,
        online=None if args.no_online else {**DEFAULTS, **args.online},
    )
    top_k = next(iter(traces.values())).top_k
    table = markdown(report, top_k)
    if args.json:
        doc = {"model": args.model, "traces": kinds, "kinds": report}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
