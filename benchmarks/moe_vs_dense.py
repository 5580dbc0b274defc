"""One MoE layer against dense SwiGLU layers of the same total and the same
active parameters: FLOPs per token and measured tokens/s, decode and prefill.

    python benchmarks/moe_vs_dense.py                     # shipped shapes + Qwen1.5-MoE-A2.7B
    python benchmarks/moe_vs_dense.py --shapes tiny-kimi --precisions float32 --reps 5
    python benchmarks/moe_vs_dense.py --config path/to/config.json  # a qwen2_moe/deepseek_v3 config

Contenders, for each shape and precision (float32, then the same weights 4-bit):

- moe: mlx-lm's own MoE block for the architecture: Qwen2MoeSparseMoeBlock
  (softmax router, top-k SwitchGLU, sigmoid-gated shared expert) or, for
  Kimi, DeepseekV3MoE (sigmoid noaux_tc router, top-k SwitchGLU, shared expert);
- moe-odmoe: the same block and weights with odmoe's OnDemandSwitchGLU over a
  MemoryStore (every expert resident: the block's no-sync path);
- dense-total: mlx-lm's SwiGLU MLP holding all experts' and the shared
  expert's weights (concatenated: the same parameters, used densely);
- dense-active: the same MLP with a token's share only: top-k experts plus
  the shared expert.

FLOPs are analytic: 2 per multiply-add of every matmul (router, routed
experts, shared expert and its gate); element-wise work is left out. Decode
is batch 1, one token per call, a different input each call; prefill is one
call on --prefill tokens. Every call ends in mx.eval. Within a repetition
the contenders run one after another in a rotating order, so machine noise
hits them alike; tables show medians. Runs on MLX's default device.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek_v3, qwen2_moe

from mlx_lm_odmoe.block import OnDemandSwitchGLU
from mlx_lm_odmoe.layout import MLX_TO_ST, PROJECTIONS, ExpertLayout, record_specs
from mlx_lm_odmoe.runtime import ExpertRuntime
from mlx_lm_odmoe.store import MemoryStore

ROOT = Path(__file__).resolve().parent.parent
# name -> (config.json, default prefill tokens). Qwen1.5-MoE-A2.7B's layer
# prefills 16 tokens: its dense-total layer takes ~1.4 s per token on a
# 2-core CPU, and 16 tokens x top-4 = 64 routes is where SwitchGLU starts
# sorting routes by expert, as it does for any real prompt.
SHAPES = {
    "tiny-qwen2-moe": ("models/tiny-qwen2-moe/config.json", 128),
    "tiny-kimi": ("models/tiny-kimi/config.json", 128),
    "qwen1.5-moe-a2.7b": ("tests/data/qwen1.5-moe-a2.7b.config.json", 16),
}
FAMILIES = {
    "qwen2_moe": "qwen2_moe",
    "qwen2_moe_odmoe": "qwen2_moe",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "kimi_k25": "deepseek_v3",
    "kimi_k2_odmoe": "deepseek_v3",
}
CONTENDERS = ("moe", "moe-odmoe", "dense-total", "dense-active")
PRECISIONS = ("float32", "4bit")
_PARTS = ("weight", "scales", "biases")


class BenchError(ValueError):
    """Bad input, reported as ``error: ...`` with exit status 2."""


@dataclass
class Shape:
    name: str
    family: str  # "qwen2_moe" or "deepseek_v3"
    args: object  # the family's ModelArgs
    prefill: int
    group_size: int  # 4-bit group size: the config's, else 64

    @property
    def dims(self):
        """(hidden D, experts E, top-k, expert hidden H, shared hidden S)."""
        a = self.args
        if self.family == "qwen2_moe":
            return (
                a.hidden_size,
                a.num_experts,
                a.num_experts_per_tok,
                a.moe_intermediate_size,
                a.shared_expert_intermediate_size,
            )
        shared = a.moe_intermediate_size * (a.n_shared_experts or 0)
        return (
            a.hidden_size,
            a.n_routed_experts,
            a.num_experts_per_tok,
            a.moe_intermediate_size,
            shared,
        )


def load_shape(name: str, path: Path, prefill: int) -> Shape:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: cannot read a config.json ({e})") from None
    params = config.get("text_config", config)  # Kimi K2.5 nests the text model
    family = FAMILIES.get(params.get("model_type"))
    if family is None:
        raise BenchError(
            f"{path}: model_type {params.get('model_type')!r} is not one of "
            f"{', '.join(FAMILIES)}; pass a Qwen2-MoE or DeepSeek-V3/Kimi config"
        )
    module = qwen2_moe if family == "qwen2_moe" else deepseek_v3
    try:
        args = module.ModelArgs.from_dict(params)
    except TypeError as e:
        raise BenchError(f"{path}: not a complete {family} config ({e})") from None
    group = (config.get("quantization") or {}).get("group_size", 64)
    return Shape(name, family, args, prefill, group)


def flops_per_token(s: Shape) -> dict:
    """Matmul FLOPs per token of each contender, and the MoE's parts."""
    D, E, k, H, S = s.dims
    parts = {
        "router": 2 * D * E,
        "experts": 2 * k * 3 * D * H,
        "shared expert": 2 * 3 * D * S,
        "shared gate": 2 * D if s.family == "qwen2_moe" else 0,
    }
    moe = sum(parts.values())
    dense = {"dense-total": 2 * 3 * D * (E * H + S), "dense-active": 2 * 3 * D * (k * H + S)}
    return {"moe": moe, "moe-odmoe": moe, **dense, "parts": parts}


def moe_block(s: Shape) -> nn.Module:
    if s.family == "qwen2_moe":
        return qwen2_moe.Qwen2MoeSparseMoeBlock(s.args)
    return deepseek_v3.DeepseekV3MoE(s.args)


def swiglu_mlp(s: Shape, hidden: int) -> nn.Module:
    D = s.dims[0]
    if s.family == "qwen2_moe":
        return qwen2_moe.MLP(D, hidden)
    return deepseek_v3.DeepseekV3MLP(s.args, intermediate_size=hidden)


def shared_of(block: nn.Module):
    for name in ("shared_expert", "shared_experts"):
        if name in block:
            return block[name]
    return None


def random_moe(s: Shape) -> nn.Module:
    block = moe_block(s)
    if s.family == "deepseek_v3":  # mlx-lm starts the router at zeros: every token alike
        D, E = s.dims[:2]
        block.gate.weight = mx.random.normal((E, D)) * D**-0.5
    mx.eval(block.parameters())
    return block


def dense_from(block: nn.Module, s: Shape, experts: int) -> nn.Module:
    """A dense SwiGLU MLP whose hidden units are the first ``experts``
    experts' and the shared expert's: their weights, concatenated."""
    D, _, _, H, S = s.dims
    glu, shared = block.switch_mlp, shared_of(block)
    gate = [glu.gate_proj.weight[:experts].reshape(-1, D)]
    up = [glu.up_proj.weight[:experts].reshape(-1, D)]
    down = [glu.down_proj.weight[:experts].transpose(1, 0, 2).reshape(D, -1)]
    if shared is not None:
        gate.append(shared.gate_proj.weight)
        up.append(shared.up_proj.weight)
        down.append(shared.down_proj.weight)
    mlp = swiglu_mlp(s, experts * H + S)  # its own (lazy) init is replaced unevaluated
    mlp.update(
        {
            "gate_proj": {"weight": mx.concatenate(gate)},
            "up_proj": {"weight": mx.concatenate(up)},
            "down_proj": {"weight": mx.concatenate(down, axis=1)},
        }
    )
    mx.eval(mlp.parameters())
    return mlp


def quantize(module: nn.Module, quantization: dict):
    """In place, as mlx_lm.convert quantizes: every layer whose input width
    the group size divides."""
    g = quantization["group_size"]

    def predicate(_, m):
        return hasattr(m, "to_quantized") and m.weight.shape[-1] % g == 0

    nn.quantize(module, group_size=g, bits=quantization["bits"], class_predicate=predicate)


def on_demand_twin(block: nn.Module, s: Shape, quantization) -> nn.Module:
    """The same block and weights, its SwitchGLU replaced by odmoe's block
    over a MemoryStore holding the stock block's stacked experts."""
    D, E, k, H, _ = s.dims
    twin = moe_block(s)
    if quantization:
        quantize(twin, quantization)
    twin.update(block.parameters())  # the lazy init above is never evaluated
    glu = block.switch_mlp
    pool = {
        f"{proj}.{part}": getattr(glu, proj)[part]
        for proj in PROJECTIONS
        for part in _PARTS
        if part in getattr(glu, proj)
    }
    specs = [
        (n, MLX_TO_ST[str(a.dtype).split(".")[-1]], tuple(a.shape[1:])) for n, a in pool.items()
    ]
    layout = ExpertLayout(E, [0], record_specs(specs), quantization)
    runtime = ExpertRuntime(None, k, 1)
    runtime.attach(MemoryStore(layout, {0: pool}))
    twin.switch_mlp = OnDemandSwitchGLU(runtime, 0, D, H, E)
    x = mx.random.normal((1, 3, D))
    if not mx.array_equal(twin(x), block(x)).item():
        raise RuntimeError(f"{s.name}: the odmoe block's output differs from mlx-lm's")
    return twin


def build(s: Shape) -> dict:
    _, E, k, _, _ = s.dims
    moe = random_moe(s)
    layers = {"moe": moe, "moe-odmoe": on_demand_twin(moe, s, None)}
    layers["dense-total"] = dense_from(moe, s, E)
    layers["dense-active"] = dense_from(moe, s, k)
    return layers


def to_4bit(layers: dict, s: Shape) -> dict:
    q = {"group_size": s.group_size, "bits": 4, "mode": "affine"}
    for name in ("moe", "dense-total", "dense-active"):
        quantize(layers[name], q)
        mx.eval(layers[name].parameters())
    layers["moe-odmoe"] = on_demand_twin(layers["moe"], s, q)
    return layers


def param_count(module: nn.Module) -> int:
    # Before quantization: logical parameters, the same for both precisions.
    return sum(v.size for _, v in nn.utils.tree_flatten(module.parameters()))


def weight_bytes(module: nn.Module) -> int:
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(module.parameters()))


def run_calls(fn, inputs, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        mx.eval(fn(inputs[i % len(inputs)]))
    return time.perf_counter() - t0


def measure(layers: dict, inputs, tokens: int, reps: int, warmup: int, min_time: float) -> dict:
    """tokens/s of each contender, one value per repetition. Warm-up calls
    size each timed loop to at least ``min_time`` seconds."""
    calls = {}
    for name, fn in layers.items():
        t = min(run_calls(fn, inputs, 1) for _ in range(warmup))
        calls[name] = max(1, math.ceil(min_time / max(t, 1e-9)))
    names, runs = list(layers), {n: [] for n in layers}
    for r in range(reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            n = calls[name]
            runs[name].append(n * tokens / run_calls(layers[name], inputs, n))
    return runs


def bench_shape(s: Shape, a) -> list:
    D = s.dims[0]
    flops = flops_per_token(s)
    print(f"{s.name}: building float32 layers", file=sys.stderr, flush=True)
    layers = build(s)
    params = {n: param_count(m) for n, m in layers.items()}
    params["moe-odmoe"] = params["moe"]  # its experts live in the store, not the module
    decode_in = [mx.random.normal((1, 1, D)) for _ in range(8)]
    prefill_in = [mx.random.normal((1, s.prefill, D)) for _ in range(2)]
    mx.eval(decode_in, prefill_in)
    rows = []
    for precision in a.precisions:
        if precision == "4bit":
            print(f"{s.name}: quantizing to 4 bits", file=sys.stderr, flush=True)
            layers = to_4bit(layers, s)
        mb = {n: weight_bytes(m) / 1e6 for n, m in layers.items()}
        mb["moe-odmoe"] = mb["moe"]
        print(f"{s.name} {precision}: timing", file=sys.stderr, flush=True)
        decode = measure(layers, decode_in, 1, a.reps, a.warmup, a.min_time)
        prefill = measure(layers, prefill_in, s.prefill, a.reps, a.warmup, a.min_time)
        for name in CONTENDERS:
            rows.append(
                {
                    "shape": s.name,
                    "precision": precision,
                    "layer": name,
                    "params": params[name],
                    "weights_mb": mb[name],
                    "flops_per_token": flops[name],
                    "prefill_tokens": s.prefill,
                    "decode_runs": decode[name],
                    "prefill_runs": prefill[name],
                    "decode_tok_s": statistics.median(decode[name]),
                    "prefill_tok_s": statistics.median(prefill[name]),
                }
            )
    return rows


def matmul_probe(m=128, k=1024, n=1024) -> dict:
    """GFLOP/s of one float32 matmul in MLX and in numpy (its BLAS): what
    the absolute numbers below are made of."""
    import numpy as np

    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a @ b)
    t = min(run_calls(lambda _: a @ b, [None], 1) for _ in range(3))
    an, bn = np.array(a), np.array(b)
    t0 = time.perf_counter()
    for _ in range(3):
        an @ bn
    tn = (time.perf_counter() - t0) / 3
    f = 2 * m * k * n / 1e9
    return {"shape": [m, k, n], "mlx_gflops": f / t, "numpy_gflops": f / tn}


def check_memory(s: Shape):
    """Refuse a layer whose float32 copies would not fit in memory."""
    D, E, k, H, S = s.dims
    need = 4 * 3 * D * (2 * (E * H + S) + k * H + S)  # moe + dense-total + dense-active
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.8 * total:
        raise BenchError(
            f"{s.name}: its float32 layers need ~{need / 1e9:.1f} GB, more than 80% of this "
            f"machine's {total / 1e9:.1f} GB; choose a smaller shape (--shapes or --config)"
        )


def ratio(x, base):
    return f"{x / base:.2f}x" if base else ""


def table(rows: list) -> str:
    head = (
        "| shape | precision | layer | params (M) | weights MB | MFLOP/token | FLOPs vs "
        "dense-active | decode tok/s | decode vs dense-active | prefill tok/s | prefill vs "
        "dense-active | prefill GFLOP/s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        base = next(
            b
            for b in rows
            if b["shape"] == r["shape"]
            and b["precision"] == r["precision"]
            and b["layer"] == "dense-active"
        )
        gflops = r["flops_per_token"] * r["prefill_tok_s"] / 1e9
        lines.append(
            f"| {r['shape']} | {r['precision']} | {r['layer']} | {r['params'] / 1e6:.2f} | "
            f"{r['weights_mb']:.1f} | {r['flops_per_token'] / 1e6:.2f} | "
            f"{ratio(r['flops_per_token'], base['flops_per_token'])} | "
            f"{r['decode_tok_s']:.1f} | {ratio(r['decode_tok_s'], base['decode_tok_s'])} | "
            f"{r['prefill_tok_s']:.1f} | {ratio(r['prefill_tok_s'], base['prefill_tok_s'])} | "
            f"{gflops:.2f} |"
        )
    return "\n".join(lines) + "\n"


def spread(rows: list) -> str:
    worst, where = 0.0, ""
    for r in rows:
        for phase in ("decode", "prefill"):
            runs = r[f"{phase}_runs"]
            s = (max(runs) - min(runs)) / statistics.median(runs)
            if len(runs) > 1 and s > worst:
                worst, where = s, f"{r['shape']} {r['precision']} {r['layer']} {phase}"
    if worst == 0.0:
        return "Spread between repetitions: not measured (1 repetition)."
    return f"Largest spread between repetitions: {worst:.0%} of the median ({where})."


def machine(a, load_before, load_after, probe) -> list:
    import mlx_lm

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"Command: `python benchmarks/moe_vs_dense.py {' '.join(a.argv)}`",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{mem:.0f} GiB; MLX {mx.__version__} on {mx.default_device()}, mlx-lm {mlx_lm.__version__}.",
        f"Load average (1/5/15 min): {'/'.join(f'{x:.2f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} after.",
        f"Float32 matmul {probe['shape']}: MLX {probe['mlx_gflops']:.1f} GFLOP/s, "
        f"numpy {probe['numpy_gflops']:.1f} GFLOP/s.",
        f"{a.reps} interleaved repetitions, medians; {a.warmup} warm-up call(s) per contender; "
        f"timed loops of at least {a.min_time:g} s; decode: batch 1, 1 token per call.",
    ]


def mflops(flops: int) -> str:
    return f"{flops / 1e6:.3g}" if flops < 1e8 else f"{flops / 1e6:,.0f}"


def plot(rows: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7), squeeze=False)
    width = 0.8 / len(precisions)
    for col, shape in enumerate(shapes):
        for row, phase in enumerate(("decode", "prefill")):
            ax = axes[row][col]
            for j, precision in enumerate(precisions):
                rs = [r for r in rows if r["shape"] == shape and r["precision"] == precision]
                xs = [i + (j - (len(precisions) - 1) / 2) * width for i in range(len(rs))]
                ax.bar(
                    xs,
                    [r[f"{phase}_tok_s"] for r in rs],
                    width,
                    label=precision,
                    hatch="//" if precision == "4bit" else None,
                )
            rs = [r for r in rows if r["shape"] == shape and r["precision"] == precisions[0]]
            labels = [f"{r['layer']}\n{mflops(r['flops_per_token'])} MFLOP/tok" for r in rs]
            ax.set_xticks(range(len(rs)), labels, fontsize=7)
            ax.set_yscale("log")
            tokens = f", {rs[0]['prefill_tokens']} tokens" if phase == "prefill" else ", 1 token"
            ax.set_title(f"{shape}: {phase}{tokens}", fontsize=9)
            ax.set_ylabel("tokens/s (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(
        "MoE layer vs dense SwiGLU layers\n(same total / same active parameters)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    p.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"Comma-separated shape names ({', '.join(SHAPES)}), or '' for none "
        "(with --config). Default: all",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PATH",
        help="Also benchmark the MoE layer of this config.json (repeatable)",
    )
    p.add_argument(
        "--precisions",
        default=",".join(PRECISIONS),
        help="Comma-separated: float32, 4bit (the same weights quantized, "
        "group size from the config, else 64). Default: both",
    )
    p.add_argument("--reps", type=int, default=3, help="Interleaved repetitions. Default: 3")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="Untimed calls per contender before timing (>= 1). Default: 1",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=0.25,
        help="Seconds each timed loop lasts at least (repeats short calls). Default: 0.25",
    )
    p.add_argument(
        "--prefill",
        type=int,
        default=None,
        help="Prompt tokens per prefill call, for every shape. Default: 128 for the "
        "tiny shapes, 16 for qwen1.5-moe-a2.7b and --config shapes",
    )
    p.add_argument(
        "--out",
        default="bench-out/moe-vs-dense",
        help="Folder for results.md, results.json and moe_vs_dense.png. "
        "Default: bench-out/moe-vs-dense",
    )
    p.add_argument("--seed", type=int, default=0, help="Random seed of weights and inputs")
    a = p.parse_args(argv)
    a.argv = list(argv if argv is not None else sys.argv[1:])
    for opt, value, low in (("--reps", a.reps, 1), ("--warmup", a.warmup, 1)):
        if value < low:
            p.error(f"{opt} {value}: must be at least {low}")
    if a.prefill is not None and a.prefill < 1:
        p.error(f"--prefill {a.prefill}: must be at least 1 token")
    if a.min_time < 0:
        p.error(f"--min-time {a.min_time}: must be 0 or more seconds")
    a.precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    bad = [x for x in a.precisions if x not in PRECISIONS]
    if bad or not a.precisions:
        p.error(f"--precisions {','.join(bad)!r}: choose from {', '.join(PRECISIONS)}")
    try:
        a.shapes = shapes_from(a)
    except BenchError as e:
        p.error(str(e))
    return a


def shapes_from(a) -> list:
    names = [x.strip() for x in a.shapes.split(",") if x.strip()]
    unknown = [x for x in names if x not in SHAPES]
    if unknown:
        raise BenchError(
            f"--shapes: unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}, "
            "or give a config.json with --config"
        )
    shapes = []
    for name in names:
        path, prefill = SHAPES[name]
        shapes.append(load_shape(name, ROOT / path, a.prefill or prefill))
    for path in map(Path, a.config):
        name = path.parent.name if path.name == "config.json" else path.name
        name = name.removesuffix(".json").removesuffix(".config")
        shapes.append(load_shape(name, path, a.prefill or 16))
    if not shapes:
        raise BenchError("nothing to run: --shapes is empty and no --config was given")
    for s in shapes:
        check_memory(s)
    return shapes


def main(argv=None) -> int:
    a = parse_args(argv)
    mx.random.seed(a.seed)
    load_before = os.getloadavg()
    probe = matmul_probe()
    rows = []
    for s in a.shapes:
        rows.extend(bench_shape(s, a))
    lines = machine(a, load_before, os.getloadavg(), probe)
    legend = (
        "moe: mlx-lm's MoE block; moe-odmoe: the same with odmoe's OnDemandSwitchGLU, every "
        "expert resident; dense-total / dense-active: mlx-lm's SwiGLU MLP with all experts' + "
        "the shared expert's parameters / with top-k experts' + the shared expert's. "
        "MFLOP/token: analytic, matmuls only (2 x active parameters). 'vs dense-active': "
        "ratio to the dense-active layer of the same shape and precision (tok/s: >1 is faster)."
    )
    text = "\n".join(lines) + "\n\n" + table(rows) + "\n" + legend + "\n\n" + spread(rows) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    meta = {
        "notes": lines,
        "spread": spread(rows),
        "probe": probe,
        "flops_parts": {s.name: flops_per_token(s)["parts"] for s in a.shapes},
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out / "moe_vs_dense.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'moe_vs_dense.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
