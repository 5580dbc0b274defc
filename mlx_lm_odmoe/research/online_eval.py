"""Recall over the course of a long generation: does online adaptation help?

    python -m mlx_lm_odmoe.research.online_eval MODEL --heldout legal.npy \\
        --shadow shadows/without-legal [--tokens 1000] [--prompts 4] [--json out.json]

The model continues ``--prompts`` prompts of the given text for
``--tokens`` sampled tokens each (traced as collect does). Every predictor
is replayed over those sequences as a decode would run it, and recall of
the true top-k is reported per window of generated positions: the first
``--window`` tokens against the last, for the shadow model adapting online,
the same model frozen, and the router lookahead. Also: the host step's time
per decode token (what the block runs for small models), both ways.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .evaluate import replay
from .traces import Trace


def generated_positions(trace: Trace) -> np.ndarray:
    """[T] index of each token among its sequence's generated ones (-1: prompt)."""
    pos = np.full(len(trace.seq), -1)
    for start, stop in trace.sequences():
        gen = np.flatnonzero(trace.generated[start:stop]) + start
        pos[gen] = np.arange(len(gen))
    return pos


def recall_by_position(predictor, trace: Trace, distance: int):
    """{d: [G] mean recall at width k of the tokens at each generated position}."""
    k, pos = trace.top_k, generated_positions(trace)
    G = int(pos.max()) + 1
    hits = {d: np.zeros(G) for d in range(1, distance + 1)}
    count = {d: np.zeros(G) for d in range(1, distance + 1)}

    def sink(i, j, idx, scores):
        d = j - i
        if d > distance:
            return
        top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
        truth = trace.topk[j, idx]
        h = (top[:, :, None] == truth[:, None, :]).any(1).sum(1) / k
        np.add.at(hits[d], pos[idx], h)
        np.add.at(count[d], pos[idx], 1)

    replay(predictor, trace, trace.generated, sink, fresh=True)  # as the block: decode starts fresh
    return {d: hits[d] / np.maximum(count[d], 1) for d in hits}


def windows(curve: np.ndarray, width: int) -> dict:
    return {"first": float(curve[:width].mean()), "last": float(curve[-width:].mean())}


def host_ms_per_token(predictor, trace: Trace, tokens: int = 200) -> float:
    """Median ms of the block's host calls (distance 1) per decode token."""
    layers, times = trace.moe_layers, []
    predictor.reset()
    for t in range(min(tokens, len(trace.tokens))):
        t0 = time.perf_counter()
        for i, l in enumerate(layers):
            predictor.host_guesses(l, trace.hidden[i, t : t + 1], trace.topk[i, t : t + 1], 1, 0.1)
        times.append(time.perf_counter() - t0)
    predictor.reset()
    return 1e3 * float(np.median(times[20:] or times))


def generate_trace(model, heldout, prompts: int, prompt_len: int, tokens: int, seed: int):
    import mlx.core as mx

    from ..block import moe_layers_of
    from .traces import assemble, run_generation

    mx.random.seed(seed)
    stride = len(heldout) // prompts
    pr = np.stack([heldout[s : s + prompt_len] for s in np.arange(prompts) * stride])
    pieces = run_generation(model, pr.astype(np.int32), tokens)
    return assemble(pieces, moe_layers_of(model), model.expert_runtime.store.layout.num_experts)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_lm_odmoe.research.online_eval",
        description="Recall early and late in long generations, adaptive vs frozen shadow model.",
    )
    p.add_argument("model")
    p.add_argument("--heldout", help="prompt text, token ids (.npy)")
    p.add_argument("--traces", help="a trace from an earlier run (--save-trace) instead")
    p.add_argument("--shadow", required=True, help="folder with shadow.json/shadow.safetensors")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--window", type=int, default=200)
    p.add_argument("--distance", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--online",
        type=json.loads,
        default={},
        help="online settings over the shadow model's own, as JSON (say '{\"bias_lr\": 0.1}')",
    )
    p.add_argument("--save-trace", help="keep the generation's trace here (.npz)")
    p.add_argument("--json", help="write the report here")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.heldout or args.traces):
        parser.error("give --heldout (prompt text) or --traces")
    import mlx_lm_odmoe

    from ..predict.baselines import RouterLookahead
    from ..predict.online import DEFAULTS
    from ..predict.shadow import ShadowModel, load_shadow

    model, _ = mlx_lm_odmoe.load(args.model, expert_cache="100%" if args.heldout else "min")
    if args.traces:
        trace = Trace.load(args.traces)
    else:
        heldout = np.load(args.heldout)
        trace = generate_trace(
            model, heldout, args.prompts, args.prompt_len, args.tokens, args.seed
        )
        if args.save_trace:
            trace.save(args.save_trace)
    net = load_shadow(model, args.shadow).net
    settings = {**(net.config.get("online") or DEFAULTS), **args.online}
    preds = {
        "router-lookahead": RouterLookahead(model, trace.moe_layers, args.distance),
        "shadow (online)": ShadowModel(model, net, online=settings),
        "shadow-frozen": ShadowModel(model, net, online=False),
    }
    report = {
        "model": args.model,
        "shadow": args.shadow,
        "online": settings,
        "sequences": len(trace.sequences()),
        "generated_per_sequence": int(trace.generated.sum()) // len(trace.sequences()),
        "window": args.window,
        "recall": {},
        "host_ms_per_token": {},
    }
    for name, p in preds.items():
        curves = recall_by_position(p, trace, args.distance)
        report["recall"][name] = {d: windows(c, args.window) for d, c in curves.items()}
        if name != "router-lookahead":
            report["host_ms_per_token"][name] = host_ms_per_token(p, trace)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def markdown(report) -> str:
    w = report["window"]
    first = next(iter(report["recall"].values()))
    ds = sorted(first)
    head = " | ".join(f"d={d} first {w} | d={d} last {w}" for d in ds)
    lines = [f"| predictor | {head} |", "|" + "---|" * (2 * len(ds) + 1)]
    for name, r in report["recall"].items():
        cells = " | ".join(f"{100 * r[d]['first']:.1f} | {100 * r[d]['last']:.1f}" for d in ds)
        lines.append(f"| {name} | {cells} |")
    times = ", ".join(f"{n} {v:.3f} ms" for n, v in report["host_ms_per_token"].items())
    lines.append(f"\nhost step per decode token (distance 1, median): {times}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
