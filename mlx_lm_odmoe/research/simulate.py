"""``mlx_lm_odmoe.simulate``: compare cache policies and prefetch on a trace.

    mlx_lm_odmoe.simulate MODEL_TRACES.npz [--model DIR] [--json] [--markdown out.md]

Replays the evaluation sequences of the trace (those no predictor was fit
on) token by token through the simulated per-layer cache at each residency,
for every policy, then for the best policy and LRU with prefetch from each
predictor. Hit rates count prefetch hits (the expert was read before it was
needed); lift is in points over plain LRU; "wasted/miss" is wasted prefetch
bytes over demand-miss bytes of that run; "reads/LRU" is all expert bytes
read (misses and prefetches) over plain LRU's.
"""

import argparse
import json
import time
from typing import Callable, Dict, List, Tuple

import numpy as np

from ..store.policy import LFUDecayPolicy, LRUKPolicy, LRUPolicy
from .cache_sim import BeladyPolicy, allocate_slots, hit_curves, predictions, run, uniform_slots
from .traces import Trace, eval_mask

POLICIES: Dict[str, Callable] = {
    "lru": LRUPolicy,
    "lfu-decay-0.9": lambda: LFUDecayPolicy(0.9),
    "lfu-decay-0.97": lambda: LFUDecayPolicy(0.97),
    "lfu-decay-0.99": lambda: LFUDecayPolicy(0.99),
    "lfu-decay-0.995": lambda: LFUDecayPolicy(0.995),
    "lru-2": lambda: LRUKPolicy(2),
    "lru-3": lambda: LRUKPolicy(3),
}


def policy_rows(trace: Trace, train: Trace, residencies: List[float]) -> List[Tuple[str, dict]]:
    """Plain policies (uniform slots), per-layer budgets, and the oracle."""
    k, E, layers = trace.top_k, trace.num_experts, trace.moe_layers
    rows = []
    for name, factory in POLICIES.items():
        rows.append(
            (name, {r: run(trace, uniform_slots(layers, E, r, k), factory()) for r in residencies})
        )
    curves = hit_curves(train.select(np.arange(len(train.tokens)) < 3000))
    per_layer = {}
    for r in residencies:
        total = sum(uniform_slots(layers, E, r, k).values())
        per_layer[r] = run(trace, allocate_slots(curves, total, k), LRUPolicy())
    rows.append(("lru, per-layer budget", per_layer))
    rows.append(
        (
            "belady (oracle bound)",
            {r: run(trace, uniform_slots(layers, E, r, k), BeladyPolicy()) for r in residencies},
        )
    )
    return rows


def prefetch_rows(
    trace: Trace,
    predictors,
    policies: Dict[str, Callable],
    residencies,
    staging: int,
    width: int,
    min_prob: float,
    lead: int = 1,
) -> List[Tuple[str, dict]]:
    k, E, layers = trace.top_k, trace.num_experts, trace.moe_layers
    rows = []
    for p in predictors:
        staged = predictions(p, trace, lead, width, min_prob)
        cut = f", p>={min_prob:g}" if min_prob and getattr(p, "calibrated", False) else ""
        for pname, factory in policies.items():
            res = {}
            for r in residencies:
                slots = uniform_slots(layers, E, r, k)
                s = min(staging, min(slots.values()) - k)  # the cache proper keeps top-k slots
                res[r] = run(trace, slots, factory(), staged if s > 0 else None, max(s, 0), lead)
            rows.append((f"{pname} + prefetch {p.name} (stage {staging}, top-{width}{cut})", res))
    return rows


def markdown(rows, residencies, lru: dict) -> str:
    """Hit rate, lift over LRU (points), wasted/miss bytes and bytes read
    relative to LRU, per residency."""
    head = (
        "| policy | "
        + " | ".join(f"{100 * r:g}%: hit | lift | wasted/miss | reads/LRU" for r in residencies)
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 4 * len(residencies))]
    for name, res in rows:
        cells = []
        for r in residencies:
            c = res[r]
            lift = 100 * (c.hit_rate - lru[r].hit_rate)
            waste = f"{c.wasted_per_miss:.2f}" if c.prefetches else "-"
            reads = (c.misses + c.prefetches) / max(lru[r].misses, 1)
            cells.append(f"{100 * c.hit_rate:.1f} | {lift:+.1f} | {waste} | {reads:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.simulate",
        description="Trace-driven expert cache simulation: hit rate per policy and residency, with and without prefetch.",
    )
    p.add_argument("traces", help="trace file (.npz) from mlx_lm_odmoe.collect")
    p.add_argument(
        "--model",
        help="model folder, for the router lookahead and shadow predictors (default: the traced one)",
    )
    p.add_argument(
        "--residency",
        type=float,
        nargs="+",
        default=[0.5, 0.25, 0.125],
        help="cache slots per layer as a share of the experts (default 0.5 0.25 0.125)",
    )
    p.add_argument(
        "--shadow", help="folder with shadow.safetensors/shadow.json (default: the model folder)"
    )
    p.add_argument(
        "--staging",
        type=int,
        help="prefetch staging slots per layer, out of the budget (default k)",
    )
    p.add_argument(
        "--width", type=int, help="experts prefetched per prediction at most (default k)"
    )
    p.add_argument(
        "--min-prob",
        type=float,
        default=0.1,
        help="skip shadow-model guesses below this probability (default 0.1)",
    )
    p.add_argument(
        "--split",
        choices=("all", "generated"),
        default="all",
        help="replay all evaluation sequences (default) or only the generated ones",
    )
    p.add_argument("--no-prefetch", action="store_true", help="policies only (no model needed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--markdown", help="also write the table to this file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    full = Trace.load(args.traces)
    held = eval_mask(full)
    if args.split == "generated":
        gen_seqs = np.unique(full.seq[full.generated])
        held &= np.isin(full.seq, gen_seqs)
    trace, train = full.select(held), full.select(~eval_mask(full))
    k = trace.top_k
    staging, width = args.staging or k, args.width or k
    t0 = time.perf_counter()
    rows = policy_rows(trace, train, args.residency)
    lru = rows[0][1]
    candidates = [(n, r) for n, r in rows if n in POLICIES]
    best = max(candidates, key=lambda nr: sum(c.hit_rate for c in nr[1].values()))[0]
    if not args.no_prefetch:
        rows += prefetch_rows(
            trace,
            _predictors(args.model or full.source, full, args.shadow),
            {"lru": LRUPolicy, **({best: POLICIES[best]} if best != "lru" else {})},
            args.residency,
            staging,
            width,
            args.min_prob,
        )
    title = (
        f"{len(trace.tokens)} tokens ({args.split} evaluation sequences), top-{k} of "
        f"{trace.num_experts} experts, {len(trace.moe_layers)} MoE layers; best plain policy: {best}"
    )
    table = markdown(rows, args.residency, lru)
    if args.json:
        print(
            json.dumps(
                {
                    "title": title,
                    "best_policy": best,
                    "rows": [
                        {"name": n, "results": {str(r): c.as_dict() for r, c in res.items()}}
                        for n, res in rows
                    ],
                },
                indent=1,
            )
        )
    else:
        print(f"{title} ({time.perf_counter() - t0:.0f} s)\n\n{table}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{title}\n\n{table}\n")


def _predictors(model_dir: str, full: Trace, shadow_dir=None):
    import mlx_lm_odmoe

    from .eval_predictors import predictors_for

    model, _ = mlx_lm_odmoe.load(model_dir, expert_cache="min")
    return predictors_for(model, model_dir, full, 1, shadow_dir)


if __name__ == "__main__":
    main()
