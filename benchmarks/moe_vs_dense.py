"""One MoE layer against dense SwiGLU layers of the same total and the same
active parameters: FLOPs per token and measured tokens/s (decode and prefill).

    python benchmarks/moe_vs_dense.py                     # shipped shapes + Qwen1.5-MoE-A2.7B
    python benchmarks/moe_vs_dense.py --shapes tiny-qwen2-moe --reps 3 --out bench-out/moe-vs-dense

The MoE layer is mlx-lm's own ``Qwen2MoeSparseMoeBlock`` (router, top-k
SwitchGLU, sigmoid-gated shared expert), float32. "dense-total" is one
SwiGLU MLP with as many parameters as all experts plus the shared expert;
"dense-active" one with as many as a token uses (top-k experts plus the
shared expert). Contenders are interleaved per repetition; medians.
Writes results.md and moe_vs_dense.png to --out.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen2_moe
from mlx_lm.models.qwen2_moe import MLP

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "tiny-qwen2-moe": ROOT / "models/tiny-qwen2-moe/config.json",
    "qwen1.5-moe-a2.7b": ROOT.parent / "shared/configs/qwen1.5-moe-a2.7b.config.json",
}
# Used when the shared configs folder is not there (Qwen1.5-MoE-A2.7B's own values).
QWEN15 = {
    "hidden_size": 2048,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
}


def shape_of(name: str) -> dict:
    path = SHAPES[name]
    c = json.loads(path.read_text()) if path.exists() else QWEN15
    keys = (
        "hidden_size",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    )
    return {k: c[k] for k in keys}


def layers(s: dict):
    D, E, k = s["hidden_size"], s["num_experts"], s["num_experts_per_tok"]
    I, S = s["moe_intermediate_size"], s["shared_expert_intermediate_size"]
    args = qwen2_moe.ModelArgs(
        model_type="qwen2_moe",
        hidden_size=D,
        num_hidden_layers=1,
        intermediate_size=S,
        num_attention_heads=1,
        num_experts=E,
        num_experts_per_tok=k,
        moe_intermediate_size=I,
        rms_norm_eps=1e-6,
        vocab_size=16,
        num_key_value_heads=1,
        shared_expert_intermediate_size=S,
    )
    moe = qwen2_moe.Qwen2MoeSparseMoeBlock(args)
    flops = {  # multiply-adds x 2 per token
        "moe": 2 * (D * E + k * 3 * D * I + 3 * D * S + D),
        "dense-total": 2 * 3 * D * (E * I + S),
        "dense-active": 2 * 3 * D * (k * I + S),
    }
    mods = {"moe": moe, "dense-total": MLP(D, E * I + S), "dense-active": MLP(D, k * I + S)}
    for m in mods.values():
        mx.eval(m.parameters())
    params = {
        n: sum(v.size for _, v in nn.utils.tree_flatten(m.parameters())) for n, m in mods.items()
    }
    return mods, flops, params


def tokens_per_s(module, D: int, tokens: int, steps: int) -> float:
    x = mx.random.normal((1, tokens, D)) * 0.1
    mx.eval(module(x))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(module(x))
    return tokens * steps / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help="Comma-separated: " + ", ".join(SHAPES)
    )
    p.add_argument("--reps", type=int, default=3, help="Interleaved repetitions. Default: 3")
    p.add_argument(
        "--prefill", type=int, default=32, help="Prompt tokens per prefill call. Default: 32"
    )
    p.add_argument("--out", default="bench-out/moe-vs-dense", help="Output folder")
    a = p.parse_args(argv)
    rows = []
    for name in a.shapes.split(","):
        s = shape_of(name)
        mods, flops, params = layers(s)
        runs = {(n, m): [] for n in mods for m in ("decode", "prefill")}
        steps = max(
            2, int(2e9 / flops["dense-total"])
        )  # ~1 s of the biggest contender at 2 GFLOP/s
        for _ in range(a.reps):
            for n, mod in mods.items():
                runs[n, "decode"].append(tokens_per_s(mod, s["hidden_size"], 1, steps))
                runs[n, "prefill"].append(
                    tokens_per_s(mod, s["hidden_size"], a.prefill, max(1, steps // a.prefill))
                )
        for n in mods:
            rows.append(
                {
                    "shape": name,
                    "layer": n,
                    "params": params[n],
                    "flops": flops[n],
                    "decode": statistics.median(runs[n, "decode"]),
                    "prefill": statistics.median(runs[n, "prefill"]),
                }
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"device {mx.default_device()}, float32, {a.reps} interleaved reps (medians), "
        f"load average {os.getloadavg()[0]:.2f}",
        "",
        "| shape | layer | params (M) | MFLOP/token | decode tok/s | prefill tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['layer']} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e6:.2f} | "
            f"{r['decode']:.0f} | {r['prefill']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    print(table)
    plot(rows, out / "moe_vs_dense.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape]
        names = [r["layer"] for r in rs]
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r["decode"] for r in rs], 0.4, label="decode tok/s")
        ax.bar([i + 0.2 for i in x], [r["prefill"] for r in rs], 0.4, label="prefill tok/s")
        ax.set_xticks(list(x), [f"{n}\n{r['flops'] / 1e6:.1f} MFLOP" for n, r in zip(names, rs)])
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
