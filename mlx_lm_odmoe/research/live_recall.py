"""Recall one layer ahead, measured in the block while the model decodes.

    python -m mlx_lm_odmoe.research.live_recall MODEL --kind code=code.npy \\
        --kind man=man.npy [--predictors next-attention,lookahead] [--json out.json]

Trace replays (``eval_predictors``, ``cross_domain``) keep each layer's MoE
input, which is all a router lookahead or a shadow model reads; the
next-attention guess also needs the next layer's KV cache and the residual
stream, so it is scored here, live. For each text kind, ``--sequences``
windows spread over the text each give a ``--prompt-len`` token prompt and
then ``--steps`` one-token passes, two ways:

  generated  the model's own continuation (temperature ``--temperature``,
             one seed per window: every predictor sees the same tokens,
             since outputs do not depend on it)
  text       the text's next tokens fed one at a time (teacher-forced)

Each predictor runs in its own copy of the model at ``--budget``, prefetch
forced on at distance 1 with every one of the top-k guesses kept
(``prefetch_min_prob`` 0), and the store's own telemetry scores each layer's
true top-k against the guesses made for it one layer earlier: recall at
width k. The copies take turns per window, with prefetch off beside them, so
the decode step times are side by side: the difference to prefetch off is
what prefetching adds to a step where reads cost almost nothing (page
cache). Each predictor also runs as a guesses-only copy (its guesses made
and scored, none read: prefetch off's hits), whose step time over prefetch
off's is the predictor's own cost.
"""

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

SPLITS = ("generated", "text")
DRY = " (guesses only)"


def load_contender(model_dir, budget, name):
    """The model for contender ``name``: ``off``, a ``predict_with`` value,
    or one with DRY appended: that predictor's guesses made and scored but
    none read (so the hits are prefetch off's, and the step time is the
    predictor's cost alone)."""
    import mlx_lm_odmoe

    predict_with = name.removesuffix(DRY)
    settings = (
        {"predictor": "off"}
        if predict_with == "off"
        else {
            "predictor": "on",
            "predict_with": predict_with,
            "prefetch_distance": 1,
            "prefetch_min_prob": 0.0,
            "prefetch_into": "cache",  # where prefetch_width caps what is read
        }
    )
    model, _ = mlx_lm_odmoe.load(model_dir, expert_cache=budget, model_config={"odmoe": settings})
    if name.endswith(DRY):
        model.expert_runtime.store.prefetch_width = 0  # guesses go nowhere
    return model


def decode_window(model, prompt, follow, split, temperature, seed):
    """Prefill ``prompt``, then ``len(follow)`` one-token passes; returns
    the decode's counts, seconds per step and tokens."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    telemetry = model.expert_runtime.store.telemetry
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    mx.eval(logits)
    telemetry.reset()  # score the decode alone
    key, tokens, steps = mx.random.key(seed), [], []
    for t in range(len(follow)):
        if split == "text":
            tok = int(follow[t])
        else:
            key, sub = mx.random.split(key)
            tok = int(mx.random.categorical(logits[0, -1] / temperature, key=sub))
        tokens.append(tok)
        t0 = time.perf_counter()
        logits = model(mx.array([[tok]]), cache=cache)
        mx.eval(logits)
        steps.append(time.perf_counter() - t0)
    s = telemetry.snapshot()
    counts = {"rh": telemetry.recall_hits, "rt": telemetry.recall_total}
    counts.update(h=s["hits"], m=s["misses"])
    return counts, steps, tokens


def windows_of(tokens: np.ndarray, n: int, length: int):
    """``n`` windows of ``length`` tokens spread evenly over ``tokens``."""
    starts = np.linspace(0, len(tokens) - length, n).astype(int)
    return [tokens[s : s + length].astype(np.int32) for s in starts]


def measure(model_dir, kinds, predictors, budget, sequences, prompt_len, steps, temperature, dry):
    contenders = ["off", *predictors, *(p + DRY for p in predictors if dry)]
    models = {c: load_contender(model_dir, budget, c) for c in contenders}
    report = {"model": str(model_dir), "budget": budget, "steps": steps, "rows": []}
    for kind, tokens in kinds.items():
        for split in SPLITS:
            acc = {c: Counter() for c in contenders}
            step = {c: [] for c in contenders}
            for i, w in enumerate(windows_of(tokens, sequences, prompt_len + steps)):
                seen = None
                for c in contenders:
                    counts, st, toks = decode_window(
                        models[c], w[:prompt_len], w[prompt_len:], split, temperature, i
                    )
                    if seen is not None and toks != seen:
                        raise RuntimeError(f"{c} decoded other tokens than prefetch off")
                    seen = toks
                    acc[c].update(counts)
                    step[c] += st[2:]  # the first steps also warm the caches
            for c, a in acc.items():
                report["rows"].append(
                    {
                        "kind": kind,
                        "split": split,
                        "predictor": c,
                        "tokens": sequences * steps,
                        "recall": a["rh"] / a["rt"] if a["rt"] else None,
                        "hit_rate": a["h"] / max(a["h"] + a["m"], 1),
                        "step_ms": 1e3 * statistics.median(step[c]),
                    }
                )
            print(markdown(report, last=len(contenders)), flush=True)
    return report


def markdown(report, last=None) -> str:
    rows = report["rows"][-last:] if last else report["rows"]
    off = {(r["kind"], r["split"]): r["step_ms"] for r in rows if r["predictor"] == "off"}
    lines = [
        "| text | split | predictor | recall d=1 (%) | hit rate (%) | step ms (median) | vs prefetch off |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = off.get((r["kind"], r["split"]))
        rel = "" if r["predictor"] == "off" or not base else f"{r['step_ms'] / base:.3f}x"
        rec = "" if r["recall"] is None else f"{100 * r['recall']:.1f}"
        lines.append(
            f"| {r['kind']} | {r['split']} | {r['predictor']} | {rec} | "
            f"{100 * r['hit_rate']:.1f} | {r['step_ms']:.2f} | {rel} |"
        )
    return "\n".join(lines)


def parse_kind(value):
    name, sep, path = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--kind wants NAME=TOKENS.npy, got {value!r}")
    return name, path


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_lm_odmoe.research.live_recall",
        description="Recall of the next layer's experts, measured in the block while decoding.",
    )
    p.add_argument("model")
    p.add_argument(
        "--kind",
        type=parse_kind,
        action="append",
        required=True,
        help="NAME=TOKENS.npy (token ids of one kind of text; repeatable)",
    )
    p.add_argument("--predictors", default="next-attention,lookahead")
    p.add_argument("--budget", default="25%")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument(
        "--no-dry",
        dest="dry",
        action="store_false",
        help="skip the guesses-only copies that time each predictor's cost alone",
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write the table here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    kinds = {}
    for name, path in args.kind:
        try:
            kinds[name] = np.load(path)
        except (OSError, ValueError) as e:
            print(f"error: --kind {name}: cannot read {path}: {e}", file=sys.stderr)
            return 2
        if len(kinds[name]) < args.prompt_len + args.steps:
            print(
                f"error: --kind {name}: {path} has {len(kinds[name])} tokens, fewer than "
                f"--prompt-len + --steps ({args.prompt_len + args.steps})",
                file=sys.stderr,
            )
            return 2
    report = measure(
        args.model,
        kinds,
        args.predictors.split(","),
        args.budget,
        args.sequences,
        args.prompt_len,
        args.steps,
        args.temperature,
        args.dry,
    )
    table = markdown(report)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
