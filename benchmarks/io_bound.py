"""Decode where the disk, not compute, sets the speed: odmoe against every
expert resident, llama.cpp's mmap, and the physical bound.

    sudo .venv/bin/python benchmarks/io_bound.py --model WIDE --out benchmarks/results/io-bound/NAME \\
        [--gguf WIDE.gguf]

WIDE is an I/O-bound testbed (``mlx_lm_odmoe.inflate --from models/tiny-qwen2-moe --width 8192
WIDE``): a trained model whose experts are widened to tens of MB, so that on
this CPU they compute faster than the disk delivers them, as on a Mac with
Metal reading from its SSD.

In one run, in this order:

1. **Disk bandwidth** with the project's own read pattern: whole expert
   records at random, read by the store's reader into memory, at queue depths
   1..16, page cache dropped before each depth.
2. **Contenders**, one process each, cold page cache, each in a memory cgroup
   of resident weights + its expert budget + ``--margin`` (so the page cache
   cannot act as a second expert cache): every expert resident (MemoryStore),
   odmoe at each budget with prediction ``auto`` (and ``off`` at
   ``--compare-prefetch``), llama.cpp (``--gguf``) in the cgroup of the
   smallest budget. Each decodes ``--tokens`` greedily after a
   ``--prompt-tokens`` prompt; counters cover the decode alone.
3. **Long prompts**: TTFT of a ``--long-prompt`` token prompt all resident and
   at ``--long-budget``.

Per contender: decode tok/s and its ratio to all resident; hit rate; missed
bytes per token; read wait (host time blocked on reads) per token; prefetch
wasted bytes; disk bytes read per token (``/proc/PID/io``); and the
**physical bound** ``max(resident step, missed bytes per token / disk
bandwidth)``, with the step's ratio to it. From each run's routes, the hit
rate Belady's offline optimum reaches with the same slots, beside the LFU
policy's in the same simulation and the store's own. Tokens of every run are
compared with the all-resident run's.

``--blas LIB`` runs every contender with another BLAS preloaded (e.g.
OpenBLAS). MLX's Linux CPU wheel bundles the reference netlib BLAS, whose
float32 matmul runs at ~2 GFLOP/s on this machine against ~100 with
OpenBLAS: prompts are then compute-bound by a kernel no Mac has (MLX uses
Accelerate and Metal there). Decode reads expert weights once per route
either way, so it changes less. The report states which BLAS ran and how
fast MLX's matmul was under it.

Writes results.md, results.json and io-bound.png to --out.
"""

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import zip_longest
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mlx_lm_odmoe.tools import bench
from mlx_lm_odmoe.tools.cgroup import drop_all_page_caches, unavailable_reason

GB = 1e9
NOTES = (
    "Bound = max(all-resident step, needed bytes per token / disk bandwidth), needed = the "
    "bytes of the token's experts that had to come off the disk: demand misses plus "
    "guesses the token then used (a miss read early still comes off the disk; guesses it did "
    "not use are not counted, so they count against the step). No overlap can beat it on "
    "this disk with this many misses. 'Bound on demand misses alone' leaves the used "
    "guesses out, as if their reads had been free. Belady and LFU (sim) replay "
    "the run's own decode routes from an empty cache with the same slots per layer. "
    "Peak RSS: the contender process's own high-water mark (VmHWM); '- bare process' takes "
    "off what a process holding no weights at all peaks at (see above), which a stock "
    "mlx-lm process carries too. "
    "Guesses used: the share of the guessed records that a token then used; needed reads a "
    "guess started: the share of the needed reads (demand misses + used guesses) that a guess "
    "had started, landed in time or still landing. "
    "Read wait: host time the forward pass spent blocked on expert reads. Predictor: CPU "
    "time of the forward pass's thread in the predictor's calls. Disk MB/token: "
    "bytes the process had read from storage (/proc/PID/io) during the decode, prefetch "
    "included. Expert checksums: each contender trusts the records an earlier process found "
    "intact in unchanged shards (store/verified.py; the all-resident contender reads every "
    "expert first). With one run per contender (see 'run' above) the machine's noise is not averaged out."
)


def disk_bandwidth(model: Path, direct: bool, depths=(1, 2, 4, 8, 16), reads: int = 24, seed=0):
    """{queue depth: GB/s} of whole-record random reads from a cold cache,
    through the store's reader, around the page cache or through it."""
    from mlx_lm_odmoe.store import ShardedFolderReader

    reader = ShardedFolderReader(model, verify=False)
    reader.set_direct_io(direct)
    lay = reader.layout
    keys = [(l, e) for l in lay.moe_layers for e in range(lay.num_experts)]
    rng = random.Random(seed)
    out = {}
    for qd in depths:
        picks = rng.sample(keys, min(reads, len(keys)))
        bufs = [np.empty(lay.record_nbytes, np.uint8) for _ in range(qd)]
        views = [[b[t.offset : t.offset + t.nbytes] for t in lay.tensors] for b in bufs]
        drop_all_page_caches()

        def read(i):
            l, e = picks[i]
            reader.read_into(l, e, views[i % qd])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(qd) as pool:  # at most qd reads in flight
            list(pool.map(read, range(len(picks))))
        out[qd] = len(picks) * lay.record_nbytes / (time.perf_counter() - t0) / GB
    reader.close()
    return out


def mlx_matmul_gflops() -> float:
    """MLX's float32 matmul speed in a fresh process with this environment
    (the contenders'; ``--blas`` changes it)."""
    code = "from mlx_lm_odmoe.tools.doctor import matmul_gflops; print(matmul_gflops()['gflops'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prompt_ids(tok, n: int):
    """The first ``n`` tokens of this package's own source text (fixed, shipped)."""
    root = Path(__file__).resolve().parent.parent / "mlx_lm_odmoe"
    text = "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    ids = tok.encode(text)
    if len(ids) < n:
        raise SystemExit(f"the prompt text has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def belady_vs_policy(routes: dict, slots: int, num_experts: int):
    """Hit rates over a run's decode routes: (Belady's optimum, LFU-decay),
    both simulated from an empty cache of ``slots`` per layer."""
    from mlx_lm_odmoe.research.cache_sim import BeladyPolicy, SimCache
    from mlx_lm_odmoe.research.traces import Trace
    from mlx_lm_odmoe.store.policy import LFUDecayPolicy

    layers = sorted(int(l) for l in routes)
    T = min(len(routes[str(l)] if str(l) in routes else routes[l]) for l in layers)
    get = lambda l: routes[str(l)] if str(l) in routes else routes[l]  # noqa: E731
    topk = np.array([[get(l)[t] for t in range(T)] for l in layers], dtype=np.int64)
    trace = Trace(
        hidden=np.zeros((T, 1), np.float16),
        topk=topk,
        tokens=np.zeros(T, np.int64),
        seq=np.zeros(T, np.int64),
        generated=np.ones(T, bool),
        moe_layers=layers,
        num_experts=num_experts,
    )
    rates = []
    for policy in (BeladyPolicy(), LFUDecayPolicy()):
        if isinstance(policy, BeladyPolicy):
            policy.bind(trace)
        sim = SimCache({l: slots for l in layers}, policy)
        for t in range(T):
            if isinstance(policy, BeladyPolicy):
                policy.at(t)
            for i, l in enumerate(layers):
                sim.fetch(l, np.unique(topk[i, t]))
        rates.append(sim.finish().hit_rate)
    return tuple(rates)


def contenders(args, sizes, budgets):
    resident, experts = sizes["resident_bytes"], sizes["expert_bytes"]
    margin = int(args.margin * GB)
    out = [
        {
            "name": "all resident",
            "kind": "resident",
            "path": args.model,
            "limit": resident + experts + margin,
        }
    ]
    for b in budgets:
        budget = bench.parse_limit(b, experts)
        out.append(
            {
                "name": f"odmoe {b}",
                "kind": "odmoe",
                "path": args.model,
                "budget": b,
                "limit": resident + budget + margin,
            }
        )
        if b in args.compare_prefetch:
            out.append(dict(out[-1], name=f"odmoe {b} prefetch off", settings={"predictor": "off"}))
    for v in args.variant:
        b, _, settings = v.partition(":")
        budget = bench.parse_limit(b, experts)
        out.append(
            {
                "name": f"odmoe {b} {settings}",
                "kind": "odmoe",
                "path": args.model,
                "budget": b,
                "limit": resident + budget + margin,
                "settings": json.loads(settings),
            }
        )
    if args.gguf:
        out.append(
            {
                "name": f"llama.cpp (mmap), cgroup of odmoe {args.gguf_budget}",
                "kind": "llamacpp",
                "path": args.gguf,
                "limit": resident + bench.parse_limit(args.gguf_budget, experts) + margin,
            }
        )
    return out


def warm_start_pair(args, sizes, counts_file: Path):
    """The same budget started twice: the first run saves its counts at
    exit, the second preloads the hottest experts from them."""
    b = args.warm_start_budget
    limit = sizes["resident_bytes"] + bench.parse_limit(b, sizes["expert_bytes"])
    settings = {"warm_start": True, "warm_start_file": str(counts_file)}
    return [
        {
            "name": f"odmoe {b}, {label}",
            "kind": "odmoe",
            "path": args.model,
            "budget": b,
            "limit": limit + int(args.margin * GB),
            "settings": settings,
        }
        for label in ("first start (no counts yet)", "warm start (counts of the first)")
    ]


def run(spec, common, args):
    limit = spec.pop("limit")
    spec = {**common, **spec}
    row = bench.run_contender(spec, SimpleNamespace(cold=True, timeout=args.timeout), limit)
    row["cgroup_limit_bytes"] = limit
    row["budget"] = spec.get("budget")
    row["settings"] = spec.get("settings")
    if row["status"] == "ok":
        n = len(row["tokens"]) - 1
        row["decode_tok_s"] = n / row["decode_s"]
        row["step_s"] = row["decode_s"] / n
        if row.get("decode_disk_read_bytes") is not None:
            row["disk_bytes_per_token"] = row["decode_disk_read_bytes"] / n
        s = row.get("stats")
        if s and row["kind"] == "odmoe":
            row["miss_bytes_per_token"] = s["misses"] * s["expert_nbytes"] / n
            row["read_wait_ms_per_token"] = 1e3 * s["read_wait_s"] / n
            if s.get("predictor_s"):
                row["predictor_ms_per_token"] = 1e3 * s["predictor_s"] / n
    print(f"  {row['name']}: {row['status']} {row.get('decode_tok_s', 0):.2f} tok/s", flush=True)
    return row


def run_rounds(specs, common, args):
    """Every contender ``args.rounds`` times, round-robin (the machine's
    load drifts over minutes; interleaving spreads it over all of them);
    per contender the run of median decode speed, with every round's."""
    runs = [[] for _ in specs]
    for i in range(args.rounds):
        if args.rounds > 1:
            print(f"round {i + 1} of {args.rounds}", flush=True)
        for spec, out in zip(specs, runs):
            out.append(run(dict(spec), common, args))
    rows = []
    for out in runs:
        ok = sorted((r for r in out if r["status"] == "ok"), key=lambda r: r["decode_tok_s"])
        row = ok[(len(ok) - 1) // 2] if ok else out[-1]
        row["rounds_tok_s"] = [r.get("decode_tok_s") for r in out]
        row["rounds_ttft_s"] = [r.get("ttft_s") for r in out]
        rows.append(row)
    return rows


def sustained_gb_s(rows) -> float:
    """The most any contender's decode read from disk per second: a floor
    on what the disk can do (reads overlap compute, so it is a floor)."""
    return max(
        (
            r["disk_bytes_per_token"] / r["step_s"] / GB
            for r in rows
            if r.get("disk_bytes_per_token")
        ),
        default=0.0,
    )


def derive(rows, bw, record):
    """Ratios and bounds; ``bw`` is raised to what a decode sustained if
    that was more (the probe is short and this disk is shared). Returns it."""
    bw = max(bw, sustained_gb_s(rows))
    base = next(r for r in rows if r["kind"] == "resident")
    for r in rows:
        if r.get("status") != "ok":
            continue
        r["tokens_match"] = r["tokens"] == base.get("tokens")
        if base.get("decode_tok_s"):
            r["vs_resident"] = r["decode_tok_s"] / base["decode_tok_s"]
        if "miss_bytes_per_token" in r and base.get("step_s"):
            s = r["stats"]
            n = len(r["tokens"]) - 1
            # A guess a token then used is a miss read early: its bytes came
            # off the disk all the same (late ones are counted as misses).
            early = s.get("prefetch_hits", 0) - s.get("prefetch_late", 0)
            r["needed_bytes_per_token"] = r["miss_bytes_per_token"] + early * record / n
            r["bound_s"] = max(base["step_s"], r["needed_bytes_per_token"] / (bw * GB))
            r["vs_bound"] = r["step_s"] / r["bound_s"]
            r["bound_missed_s"] = max(base["step_s"], r["miss_bytes_per_token"] / (bw * GB))
            if s.get("misses"):
                r["wasted_vs_missed"] = s["wasted_bytes"] / (s["misses"] * record)
            guessed = s.get("prefetched_bytes", 0) / record
            used = s.get("prefetch_hits", 0)  # landed in time or still landing
            if guessed:
                r["guesses_used"] = used / guessed  # precision
                r["needed_read_early"] = used / max(s["misses"] + early, 1)  # coverage
        if r.get("routes") and r["kind"] == "odmoe":
            s = r["stats"]
            r["belady_hit_rate"], r["sim_lfu_hit_rate"] = belady_vs_policy(
                r["routes"], s["slots_per_layer"], s["num_experts"]
            )
    return bw


def derive_long(long_rows, bw):
    """TTFT bound: all-resident prefill + the bytes the prompt read / disk."""
    base = long_rows[0] if long_rows else {}
    for r in long_rows[1:]:
        ps = r.get("prefill_stats") or {}
        if r.get("status") == "ok" and base.get("ttft_s"):
            r["prefill_read_bytes"] = ps.get("bytes_read")
            r["ttft_bound_s"] = base["ttft_s"] + (ps.get("bytes_read") or 0) / (bw * GB)
            r["ttft_vs_bound"] = r["ttft_s"] / r["ttft_bound_s"]


def _fmt(x, f="{:.2f}"):
    return "" if x is None else f.format(x)


def markdown(meta, bw, rows, long_rows, warm_rows=()):
    lines = [f"# {meta['title']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta["facts"].items()]
    lines += [
        "",
        "## Disk: expert-record random reads, cold page cache",
        "",
        "| reads (GB/s) at queue depth | " + " | ".join(str(q) for q in bw["direct"]) + " |",
        "|---|" + "---|" * len(bw["direct"]),
        *(
            f"| {mode} | " + " | ".join(f"{x:.2f}" for x in v.values()) + " |"
            for mode, v in bw.items()
        ),
        "",
        "## Decode (I/O-bound regime: cold, each contender in its own cgroup)",
        "",
        "| contender | cgroup limit | tok/s | vs resident | step ms | bound ms | step / bound "
        "| bound on demand misses alone ms "
        "| hit rate | Belady | LFU (sim) | missed MB/token | disk MB/token | read wait ms/token "
        "| prefetch | wasted / missed | guesses used | needed reads a guess started "
        "| predictor ms/token | TTFT s | peak cgroup | peak RSS "
        "| RSS / (resident + budget) | (RSS - bare process) / (resident + budget) | tokens match |",
        "|---" * 25 + "|",
    ]
    margin, bare = meta.get("margin_gb"), meta.get("bare_rss_bytes")
    for r in rows:
        s = r.get("stats") or {}
        held = None  # resident weights + the budget: the cgroup less its margin
        if margin is not None and r.get("budget") and r.get("cgroup_limit_bytes"):
            held = r["cgroup_limit_bytes"] - margin * GB
        lines.append(
            "| "
            + " | ".join(
                [
                    r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
                    bench._gb(r.get("cgroup_limit_bytes")),
                    _fmt(r.get("decode_tok_s")),
                    _fmt(r.get("vs_resident"), "{:.2f}x"),
                    _fmt(r.get("step_s") and 1e3 * r["step_s"], "{:.0f}"),
                    _fmt(r.get("bound_s") and 1e3 * r["bound_s"], "{:.0f}"),
                    _fmt(r.get("vs_bound"), "{:.2f}x"),
                    _fmt(r.get("bound_missed_s") and 1e3 * r["bound_missed_s"], "{:.0f}"),
                    _fmt(s.get("hit_rate"), "{:.1%}"),
                    _fmt(r.get("belady_hit_rate"), "{:.1%}"),
                    _fmt(r.get("sim_lfu_hit_rate"), "{:.1%}"),
                    _fmt(
                        r.get("miss_bytes_per_token") and r["miss_bytes_per_token"] / 1e6, "{:.0f}"
                    ),
                    _fmt(
                        r.get("disk_bytes_per_token") and r["disk_bytes_per_token"] / 1e6, "{:.0f}"
                    ),
                    _fmt(r.get("read_wait_ms_per_token"), "{:.0f}"),
                    str(s.get("prefetch", "")),
                    _fmt(r.get("wasted_vs_missed"), "{:.2f}"),
                    _fmt(r.get("guesses_used"), "{:.0%}"),
                    _fmt(r.get("needed_read_early"), "{:.0%}"),
                    _fmt(r.get("predictor_ms_per_token"), "{:.2f}"),
                    _fmt(r.get("ttft_s")),
                    bench._gb(r.get("cgroup_peak_bytes")),
                    bench._gb(r.get("peak_rss_bytes")),
                    _fmt(
                        held and r.get("peak_rss_bytes") and r["peak_rss_bytes"] / held, "{:.2f}x"
                    ),
                    _fmt(
                        held
                        and bare
                        and r.get("peak_rss_bytes")
                        and (r["peak_rss_bytes"] - bare) / held,
                        "{:.2f}x",
                    ),
                    {True: "yes", False: "**no**"}.get(r.get("tokens_match"), ""),
                ]
            )
            + " |"
        )
    if any(len(r.get("rounds_tok_s") or ()) > 1 for r in rows):
        lines += ["", "Every round (decode tok/s; TTFT s):", ""]
        for r in rows:
            per = zip_longest(r.get("rounds_tok_s") or (), r.get("rounds_ttft_s") or ())
            cells = ", ".join(f"{_fmt(t)}" + (f"; {_fmt(f)}" if f else "") for t, f in per)
            lines.append(f"- {r['name']}: {cells}")
    if long_rows:
        lines += [
            "",
            f"## Long prompt ({meta['long_prompt']} tokens): time to first token",
            "",
            "| contender | TTFT s | bytes read in the prompt | bound s | TTFT / bound |",
            "|---|---|---|---|---|",
        ]
        for r in long_rows:
            lines.append(
                f"| {r['name']} | {_fmt(r.get('ttft_s'))} | {bench._gb(r.get('prefill_read_bytes'))} "
                f"| {_fmt(r.get('ttft_bound_s'))} | {_fmt(r.get('ttft_vs_bound'), '{:.2f}x')} |"
            )
    if warm_rows:
        lines += [
            "",
            "## Warm start: the first 64 tokens after a restart",
            "",
            "| contender | TTFT s | decode tok/s | hit rate | preloaded at load | tokens match |",
            "|---|---|---|---|---|---|",
        ]
        for r in warm_rows:
            s = r.get("load_stats") or {}
            d = r.get("stats") or {}
            lines.append(
                f"| {r['name']} | {_fmt(r.get('ttft_s'))} | {_fmt(r.get('decode_tok_s'))} "
                f"| {_fmt(d.get('hit_rate'), '{:.1%}')} | {bench._gb(s.get('preloaded_bytes'))} "
                f"| {'yes' if r.get('tokens') == warm_rows[0].get('tokens') else '**no**'} |"
            )
    lines += ["", meta["notes"], ""]
    return "\n".join(lines)


def _pct(r) -> float:
    return float(str(r["budget"]).rstrip("%"))


def plot(rows, path, title):
    """Decode tok/s per budget: prediction auto and off, each beside its
    physical bound, all resident and llama.cpp as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {
        "odmoe, prediction auto": lambda r: not r.get("settings"),
        "odmoe, prediction off": lambda r: r.get("settings") == {"predictor": "off"},
    }
    for (label, pick), color in zip(series.items(), ("C0", "C2")):
        pts = sorted(
            (r for r in rows if r["kind"] == "odmoe" and r.get("decode_tok_s") and pick(r)),
            key=_pct,
        )
        if not pts:
            continue
        x = [_pct(r) for r in pts]
        ax.plot(x, [r["decode_tok_s"] for r in pts], "o-", color=color, label=label)
        ax.plot(
            x,
            [1 / r["bound_s"] for r in pts],
            "s:",
            color=color,
            alpha=0.6,
            label=f"{label}: physical bound",
        )
    for r in rows:
        if r["kind"] == "resident" and r.get("decode_tok_s"):
            ax.axhline(r["decode_tok_s"], color="gray", ls="--", label="all experts resident")
        if r["kind"] == "llamacpp" and r.get("decode_tok_s"):
            ax.axhline(r["decode_tok_s"], color="C3", ls="-.", label=r["name"])
    ax.set_xlabel("expert budget (% of all routed experts)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _bw_fact(probe: float, used: float) -> str:
    if used > probe:
        return (
            f"{used:.2f} GB/s: what a contender's decode sustained, above the probe's best "
            f"({probe:.2f} GB/s over both modes and all queue depths)"
        )
    return f"{used:.2f} GB/s (the probe's best over both modes and all queue depths)"


def write_report(out: Path, meta, bw, rows, long_rows, warm_rows):
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "disk_gb_s": bw, "rows": rows, "long": long_rows, "warm": warm_rows},
            indent=1,
        )
    )
    png = plot(rows, out / "io-bound.png", meta["title"])
    md = markdown(meta, bw, rows, long_rows, warm_rows)
    if png:
        md += f"\n![decode tok/s per budget]({png.name})\n"
    (out / "results.md").write_text(md)
    return md


def render(path: Path):
    d = json.loads(path.read_text())
    d["meta"]["notes"] = NOTES
    bw = {mode: {int(q): v for q, v in x.items()} for mode, x in d["disk_gb_s"].items()}
    best = max(max(v.values()) for v in bw.values())
    record = next(r["stats"]["expert_nbytes"] for r in d["rows"] if r.get("stats"))
    used = derive(d["rows"], best, record)
    derive_long(d["long"], used)
    d["meta"]["facts"]["disk bandwidth used for bounds"] = _bw_fact(best, used)
    print(write_report(path.parent, d["meta"], bw, d["rows"], d["long"], d.get("warm", [])))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="odmoe model folder (an inflated testbed).")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="Only rewrite results.md and the plot from an earlier run's results.json.",
    )
    p.add_argument("--gguf", help="GGUF of the same model: adds llama.cpp in the same cgroup.")
    p.add_argument("--budgets", default="50%,25%,12.5%", help="Default: 50%%,25%%,12.5%%")
    p.add_argument(
        "--compare-prefetch", default="25%", help="Budgets also run with prediction off."
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="BUDGET:JSON, e.g. '25%%:{\"prefetch_staging\": 2}': also run odmoe at BUDGET with "
        "these odmoe settings (repeatable).",
    )
    p.add_argument("--tokens", type=int, default=48, help="Decoded tokens per run. Default: 48")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Default: 64")
    p.add_argument("--long-prompt", type=int, default=2048, help="0 skips. Default: 2048")
    p.add_argument("--long-budget", default="25%", help="Default: 25%%")
    p.add_argument(
        "--gguf-budget", default="25%", help="llama.cpp's cgroup: odmoe's at this budget"
    )
    p.add_argument(
        "--warm-start-budget", default="25%", help="'' skips the warm-start pair. Default: 25%%"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Decode runs per contender, interleaved; the median is reported. Default: 1",
    )
    p.add_argument(
        "--blas",
        help="Shared library preloaded into every contender (LD_PRELOAD), e.g. "
        "libopenblas.so.0: MLX's Linux CPU wheel bundles the "
        "reference BLAS (see above).",
    )
    p.add_argument("--margin", type=float, default=0.8, help="cgroup GB beyond. Default: 0.8")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--title")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    if not (args.model and args.out):
        p.error("--model and --out are required")
    reason = unavailable_reason()
    if reason:
        sys.exit(f"io_bound: {reason}")
    os.environ.setdefault("MLX_LM_ODMOE_WARM_START", "0")  # contenders start cold
    if args.blas:
        try:
            ctypes.CDLL(args.blas)  # a path or a name the loader finds
        except OSError as e:
            p.error(f"--blas {args.blas}: cannot load it ({e})")
        os.environ["LD_PRELOAD"] = args.blas  # inherited by every contender
    gflops = mlx_matmul_gflops()
    model = bench.model_folder(args.model)
    args.model = str(model)
    args.compare_prefetch = [b.strip() for b in args.compare_prefetch.split(",") if b.strip()]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = bench.model_sizes(model)
    from mlx_lm.utils import load_tokenizer

    from mlx_lm_odmoe.layout import load_layout

    record = load_layout(model / "experts").record_nbytes
    tok = load_tokenizer(model)
    print("disk bandwidth ...", flush=True)
    bw = {mode: disk_bandwidth(model, mode == "direct") for mode in ("direct", "buffered")}
    best = max(max(v.values()) for v in bw.values())
    for mode, v in bw.items():
        print(f"  {mode}: " + ", ".join(f"QD{q} {x:.2f} GB/s" for q, x in v.items()), flush=True)
    common = {
        "tokens": args.tokens,
        "warmup_tokens": 1,
        "prompt_ids": prompt_ids(tok, args.prompt_tokens),
        "warmup_ids": tok.encode(bench.WARMUP_PROMPT),
        "trace": True,
        "split_stats": True,
        "n_ctx": max(args.prompt_tokens, args.long_prompt) + args.tokens + 64,
    }
    bare = bench.run_contender(
        {"name": "bare process", "kind": "bare", "path": args.model},
        SimpleNamespace(cold=False, timeout=args.timeout),
        None,
    )
    bare_rss = bare.get("peak_rss_bytes") if bare["status"] == "ok" else None
    rows = run_rounds(contenders(args, sizes, budgets), common, args)
    used = derive(rows, best, record)

    warm_rows = []
    if args.warm_start_budget:
        print("warm start ...", flush=True)
        counts = out / "warm-start-counts.json"
        counts.unlink(missing_ok=True)
        warm = dict(common, tokens=64, trace=False)
        warm_rows = [run(spec, warm, args) for spec in warm_start_pair(args, sizes, counts)]
        counts.unlink(missing_ok=True)

    long_rows = []
    if args.long_prompt:
        print(f"{args.long_prompt}-token prompt ...", flush=True)
        long = dict(common, prompt_ids=prompt_ids(tok, args.long_prompt), tokens=2, trace=False)
        specs = [s for s in contenders(args, sizes, [args.long_budget]) if s["kind"] != "llamacpp"]
        specs = [s for s in specs if "settings" not in s]
        for spec in specs:
            spec["name"] += f", {args.long_prompt}-token prompt"
            long_rows.append(run(spec, long, args))
        derive_long(long_rows, used)

    meta = {
        "title": args.title or f"I/O-bound decode: {model.name}",
        "long_prompt": args.long_prompt,
        "margin_gb": args.margin,
        "bare_rss_bytes": bare_rss,
        "facts": {
            "model": f"{model.name}: {sizes['expert_bytes'] / GB:.2f} GB of experts "
            f"({record / 1e6:.1f} MB each), {sizes['resident_bytes'] / 1e6:.0f} MB resident weights",
            "regime": "I/O-bound: cold page cache before every contender; each in a memory cgroup "
            f"of resident weights + its budget + {args.margin} GB",
            "disk bandwidth used for bounds": _bw_fact(best, used),
            "run": f"{args.prompt_tokens}-token prompt, {args.tokens} greedy tokens, "
            + (
                f"median of {args.rounds} interleaved rounds (every round's tok/s in results.json)"
                if args.rounds > 1
                else "1 run each"
            ),
            "bare process (Python, MLX, mlx-lm, the tokenizer; no weights): peak RSS": bench._gb(
                bare_rss
            ),
            "MLX BLAS": (args.blas or "the wheel's own (reference BLAS)")
            + f": float32 matmul {gflops:.1f} GFLOP/s",
            "machine": bench._machine(),
            "load average": bench._load_average(),
            "versions": bench._versions(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "notes": NOTES,
    }
    for r in rows + long_rows + warm_rows:
        r.pop("routes", None)
    print(write_report(out, meta, bw, rows, long_rows, warm_rows))


if __name__ == "__main__":
    main()
