"""Recall of the true top-k, per predictor, distance and width.

Evaluation replays each held-out sequence as a decode would: one position
at a time, every MoE layer in order, the sequences of equal length side by
side as one batch (row i continues row i, as in batched decode), so
stateful predictors see exactly what they would see online. Only the
positions selected by ``positions`` (the generated ones, by default) are
scored.
"""

from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

from .traces import Trace


class RecallCounter:
    """Sums of |top-w(scores) ∩ true top-k| / k over (distance, width)."""

    def __init__(self, top_k: int, widths: List[int]):
        self.top_k, self.widths = top_k, widths
        self.hits: Dict[tuple, float] = {}
        self.count: Dict[int, int] = {}

    def add(self, distance: int, scores: np.ndarray, truth: np.ndarray):
        order = np.argsort(-scores, axis=-1, kind="stable")
        for w in self.widths:
            top = order[:, :w]
            hit = (top[:, :, None] == truth[:, None, :]).any(1).sum()
            self.hits[(distance, w)] = self.hits.get((distance, w), 0.0) + hit / self.top_k
        self.count[distance] = self.count.get(distance, 0) + len(truth)

    def recall(self) -> Dict[int, Dict[int, float]]:
        """{width: {distance: recall}}."""
        return {
            w: {d: self.hits[(d, w)] / n for d, n in sorted(self.count.items())}
            for w in self.widths
        }


def replay(predictor, trace: Trace, positions: np.ndarray, sink: Callable, fresh=False):
    """Run ``predictor`` over every sequence of ``trace``; for the rows at
    ``positions`` call ``sink(source row, target row, token indices, scores)``
    (rows index ``trace.moe_layers``). ``fresh``: reset the predictor at the
    first scored step, as the block does when decoding starts (it shows the
    predictor nothing of the prompt), so online learning starts there."""
    layers = trace.moe_layers
    groups: Dict[int, list] = {}
    for start, stop in trace.sequences():
        if positions[start:stop].any():
            groups.setdefault(stop - start, []).append(start)
    for length, starts in groups.items():
        predictor.reset()
        rows, started = np.array(starts), False
        for t in range(length):
            idx = rows + t
            scored = positions[idx]
            if fresh and not started and scored.any():
                predictor.reset()
                started = True
            for i, l in enumerate(layers):
                out = predictor.predict(
                    l, mx.array(trace.hidden[i, idx]), mx.array(trace.topk[i, idx])
                )
                if not scored.any() or not out:
                    continue
                mx.eval(out)
                for target, s in out.items():
                    sink(i, layers.index(target), idx[scored], np.array(s)[scored])
    predictor.reset()


def evaluate(
    predictors, trace: Trace, positions: np.ndarray, widths=None, fresh=False
) -> Dict[str, dict]:
    """{predictor name: {"recall@w": {distance: recall}}} (``fresh``: see :func:`replay`)."""
    k = trace.top_k
    widths = widths or [k, 2 * k]
    results = {}
    for p in predictors:
        counter = RecallCounter(k, widths)
        replay(
            p,
            trace,
            positions,
            lambda i, j, idx, s: counter.add(j - i, s, trace.topk[j, idx]),
            fresh,
        )
        results[p.name] = {f"recall@{w}": r for w, r in counter.recall().items()}
    return results


def time_per_token(predictor, trace: Trace, tokens: int = 200, warmup: int = 20) -> float:
    """Median seconds per decode token (one row, every MoE layer, evaluated)."""
    import time

    layers, times = trace.moe_layers, []
    predictor.reset()
    for t in range(min(tokens + warmup, len(trace.tokens))):
        t0 = time.perf_counter()
        for i, l in enumerate(layers):
            mx.eval(
                predictor.predict(
                    l, mx.array(trace.hidden[i, t : t + 1]), mx.array(trace.topk[i, t : t + 1])
                )
            )
        times.append(time.perf_counter() - t0)
    predictor.reset()
    return float(np.median(times[warmup:]))


def markdown_table(results: Dict[str, dict], top_k: int) -> str:
    """Predictors as rows, (distance, width) as columns, recall in percent."""
    first = next(iter(results.values()))
    widths = [int(key.split("@")[1]) for key in first if key.startswith("recall@")]
    distances = sorted(
        {
            d
            for r in results.values()
            for key, v in r.items()
            if key.startswith("recall@")
            for d in v
        }
    )
    cols = [(d, w) for d in distances for w in widths]
    head = (
        "| predictor | "
        + " | ".join(f"d={d} @{'k' if w == top_k else f'{w // top_k}k'}" for d, w in cols)
        + " |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        cells = [f"{100 * r[f'recall@{w}'].get(d, float('nan')):.1f}" for d, w in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Dict[str, dict], top_k: int, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        for key, style in zip([key for key in r if key.startswith("recall@")], ("-", "--")):
            d = sorted(r[key])
            w = int(key.split("@")[1])
            label = f"{name} @{'k' if w == top_k else f'{w // top_k}k'}"
            ax.plot(d, [100 * r[key][x] for x in d], style, marker="o", color=color, label=label)
    ax.set_xlabel("distance (MoE layers ahead)")
    ax.set_ylabel("recall of the true top-k (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(
        sorted(
            {
                d
                for r in results.values()
                for key, v in r.items()
                if key.startswith("recall@")
                for d in v
            }
        )
    )
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
