"""Residency curves: what each expert budget costs against all experts resident.

    mlx_lm_odmoe.bench --model models/tiny-qwen2-moe --stock /path/to/stock-mlx --out bench-out
    mlx_lm_odmoe.bench --model DIR --quick --out bench-quick        # smoke run
    sudo mlx_lm_odmoe.bench --model DIR --stock DIR-stock --gguf DIR.gguf \\
        --cgroup-limit 50% --budgets 2GB --out bench-out/cgroup     # bigger than RAM

Contenders run one at a time, each in its own process, so peak RSS is per
contender (its own high-water mark, VmHWM on Linux). Repetitions are interleaved (round 1 of
every contender, then round 2, ...) so machine noise hits all alike; the
table shows medians. Every run decodes the same token ids from a fixed
Python prompt greedily with EOS banned, so each makes --tokens tokens.

The baseline has every expert resident: stock mlx-lm on --stock (a stacked
checkpoint), else the odmoe folder's experts read into a MemoryStore (one
stacked array per layer, no cache logic). The output says which.

Each process first decodes --warmup-tokens from another prompt (one-time
costs such as MLX's compilation), then counters are reset and the measured
run starts: time to first token (prompt + first token), decode tok/s over
the remaining tokens, and for odmoe the cache's hit rate, bytes read and
fetch latency p50/p99 during the measured run.

--cgroup-limit runs each contender inside a memory cgroup (root, cgroup v1)
with a cold page cache: odmoe at --budgets, stock mlx-lm (--stock) and
llama.cpp through llama-cpp-python with mmap (--gguf), reporting decode
tok/s, peak cgroup usage and OOM kills. A contender past --timeout is killed
and reported as such.

Writes results.md, results.json and residency.png (with matplotlib) to --out.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

PROMPT = '''import heapq


def dijkstra(graph, source):
    """Shortest distances from source in a graph of {node: [(neighbour, weight)]}."""
    dist = {source: 0}
    queue = [(0, source)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > dist.get(node, float("inf")):
            continue
        for neighbour, weight in graph.get(node, ()):
'''
WARMUP_PROMPT = "def add(a, b):\n    return"
RESULT_TAG = "ODMOE_BENCH_RESULT "
DEFAULT_BUDGETS = "100%,50%,25%,12.5%"
# Run lengths of a measuring run and of --quick (a smoke run).
FULL = {"tokens": 128, "reps": 3, "warmup_tokens": 4}
QUICK = {"tokens": 8, "reps": 1, "warmup_tokens": 1}


# -- worker: one contender, one process ------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's own peak resident set. On Linux that is VmHWM:
    ru_maxrss also counts the RSS of the parent it was forked from (the
    benchmark driver), since the kernel keeps the larger across exec."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _load_mlx(spec: dict):
    import mlx_lm

    import mlx_lm_odmoe

    kind = spec["kind"]
    if kind == "stock":
        return mlx_lm.load(spec["path"])
    if kind == "resident":
        # Cheapest store to open, then every expert read into one stacked
        # array per layer: a model with all experts in memory, no cache logic.
        from ..runtime import runtime_of
        from ..store import MemoryStore

        model, tok = mlx_lm_odmoe.load(spec["path"], expert_cache="min")
        rt = runtime_of(model)
        old = rt.store
        rt.attach(MemoryStore.from_reader(old.reader, telemetry=old.telemetry))
        old.close()  # the reader is not needed once every expert is in memory
        return model, tok
    settings = spec.get("settings")
    return mlx_lm_odmoe.load(
        spec["path"],
        expert_cache=spec["budget"],
        model_config={"odmoe": settings} if settings else None,
    )


def _disk_read_bytes() -> Optional[int]:
    """Bytes this process has had read from storage (not the page cache)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_s() -> float:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _mlx_generate(model, tok, ids: List[int], n: int, on_first=None):
    """Greedy, EOS banned; returns (ttft_s, decode_s, decode_cpu_s, token ids)."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    eos = sorted(tok.eos_token_ids)

    def no_eos(tokens, logits):
        banned = [
            i for i in eos if i < logits.shape[-1]
        ]  # configs may name ids past the vocabulary
        return logits.at[..., banned].add(-1e9) if banned else logits

    out, t0, t_first = [], time.perf_counter(), None
    for r in mlx_lm.stream_generate(
        model,
        tok,
        ids,
        max_tokens=n,
        sampler=make_sampler(0.0),
        logits_processors=[no_eos] if eos else None,
    ):
        out.append(int(r.token))
        if t_first is None:
            t_first, c_first, io_first = time.perf_counter(), _cpu_s(), _disk_read_bytes()
            if on_first is not None:
                on_first()
    io = _disk_read_bytes()
    t_end = time.perf_counter()
    disk = io - io_first if io is not None else None
    return t_first - t0, t_end - t_first, _cpu_s() - c_first, out, disk


def _odmoe_stats(model) -> Optional[dict]:
    import mlx_lm_odmoe

    try:
        s = mlx_lm_odmoe.stats(model)
    except TypeError:
        return None
    keys = (
        "hits",
        "misses",
        "hit_rate",
        "bytes_read",
        "evictions",
        "fetch_latency_p50_ms",
        "fetch_latency_p99_ms",
        "budget_bytes",
        "resident_bytes",
        "slots_per_layer",
        "num_experts",
        "expert_nbytes",
        "read_wait_s",
        "predictor_s",
        "preloaded_bytes",
        "prefetch",
        "prefetched_bytes",
        "prefetch_hits",
        "prefetch_late",
        "wasted_bytes",
        "predictor_recall",
    )
    return {k: s[k] for k in keys}


def _reset_stats(model):
    rt = getattr(model, "expert_runtime", None)
    if rt is not None:
        rt.store.telemetry.reset()


def _record_decode_routes(model) -> Optional[dict]:
    """{layer: [ids of each decode step]} as the routers chose them."""
    rt = getattr(model, "expert_runtime", None)
    if rt is None:
        return None
    routes = {}

    def observe(layer, x, indices):
        if x.shape[1] == 1:
            routes.setdefault(layer, []).append(indices.reshape(-1))

    rt.observers.append(observe)  # host copies only at the end: no extra sync
    return routes


def _run_mlx(spec: dict) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    model, tok = _load_mlx(spec)
    load_s = time.perf_counter() - t0
    at_load = _odmoe_stats(model)  # e.g. what warm start preloaded
    if spec["warmup_tokens"]:
        _mlx_generate(model, tok, spec["warmup_ids"], spec["warmup_tokens"])
    _reset_stats(model)
    routes = _record_decode_routes(model) if spec.get("trace") else None
    prefill = {}

    def decode_only():  # the prompt's counters, then the decode's alone
        prefill["stats"] = _odmoe_stats(model)
        _reset_stats(model)

    ttft, decode_s, cpu_s, out, disk = _mlx_generate(
        model,
        tok,
        spec["prompt_ids"],
        spec["tokens"],
        on_first=decode_only if spec.get("split_stats") else None,
    )
    if prefill:
        extra_prefill = {"prefill_stats": prefill["stats"]}
    else:
        extra_prefill = {}
    extra = {}
    if routes is not None:
        extra["routes"] = {l: [np.array(r).tolist() for r in v] for l, v in routes.items()}
    return {
        **extra,
        **extra_prefill,
        "load_stats": at_load,
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": decode_s,
        "decode_cpu_s": cpu_s,
        "decode_disk_read_bytes": disk,
        "tokens": out,
        "stats": _odmoe_stats(model),
    }


def _run_llamacpp(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList

    threads = spec.get("threads") or os.cpu_count()
    t0 = time.perf_counter()
    llm = Llama(
        model_path=spec["path"],
        n_ctx=spec["n_ctx"],
        n_threads=threads,
        n_threads_batch=threads,
        use_mmap=True,
        use_mlock=False,
        verbose=False,
        seed=0,
    )
    load_s = time.perf_counter() - t0
    eos = [i for i in (llm.token_eos(),) if i is not None and 0 <= i < llm.n_vocab()]

    def no_eos(_ids, scores):
        scores[eos] = -np.inf
        return scores

    procs = LogitsProcessorList([no_eos]) if eos else None

    def gen(ids, n):
        out, t0, t_first = [], time.perf_counter(), None
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True, logits_processor=procs):
            out.append(int(token))
            if t_first is None:
                t_first, c_first, io_first = time.perf_counter(), _cpu_s(), _disk_read_bytes()
            if len(out) == n:
                break
        io = _disk_read_bytes()
        disk = io - io_first if io is not None else None
        return t_first - t0, time.perf_counter() - t_first, _cpu_s() - c_first, out, disk

    if spec["warmup_tokens"]:
        gen(spec["warmup_ids"], spec["warmup_tokens"])
    ttft, decode_s, cpu_s, out, disk = gen(spec["prompt_ids"], spec["tokens"])
    return {
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": decode_s,
        "decode_cpu_s": cpu_s,
        "decode_disk_read_bytes": disk,
        "tokens": out,
        "stats": None,
    }


def _run_bare(spec: dict) -> dict:
    """What any MLX contender holds before its first weight: Python, MLX,
    mlx-lm (with this plugin) and the model's tokenizer."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    load_tokenizer(Path(spec["path"]))
    mx.eval(mx.zeros(1) + 1)
    return {"tokens": [], "stats": None}


def worker(spec: dict):
    run = {"llamacpp": _run_llamacpp, "bare": _run_bare}.get(spec["kind"], _run_mlx)
    result = run(spec)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- parent: contenders, subprocesses, cgroups -------------------------------------


def _contenders(args) -> List[dict]:
    out = []
    if args.cgroup_limit is None or args.stock:
        if args.stock:
            out.append({"name": "stock mlx-lm", "kind": "stock", "path": args.stock})
        elif not args.no_baseline:
            out.append({"name": "resident (MemoryStore)", "kind": "resident", "path": args.model})
    for b in [b.strip() for b in args.budgets.split(",") if b.strip()]:
        out.append({"name": f"odmoe@{b}", "kind": "odmoe", "path": args.model, "budget": b})
    if args.gguf:
        out.append({"name": "llama.cpp (mmap)", "kind": "llamacpp", "path": args.gguf})
    return out


def _wait(proc: subprocess.Popen, timeout: float):
    """wait4 the child (its own rusage) with a kill timer."""
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            proc.kill()
        except OSError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, timed_out.is_set()


def run_contender(spec: dict, args, cgroup_limit: Optional[int]) -> dict:
    from .cgroup import MemoryCgroup, drop_all_page_caches

    if args.cold or cgroup_limit:
        drop_all_page_caches()
    cmd = [sys.executable, "-m", "mlx_lm_odmoe.tools.bench", "--worker", json.dumps(spec)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # Every contender starts cold: no warm start from an earlier contender's
    # counts (a spec's own settings may still ask for it).
    env.setdefault("MLX_LM_ODMOE_WARM_START", "0")
    row = {"name": spec["name"], "kind": spec["kind"]}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        cg = MemoryCgroup(cgroup_limit) if cgroup_limit else None
        try:
            t0 = time.perf_counter()
            proc = (cg.popen if cg else subprocess.Popen)(cmd, stdout=out, stderr=err, env=env)
            rc, maxrss, timed_out = _wait(proc, args.timeout)
            row["wall_s"] = time.perf_counter() - t0
            if cg:
                row["cgroup_peak_bytes"] = cg.peak_bytes
                row["oom_kills"] = cg.oom_kills
        finally:
            if cg:
                cg.close()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    # wait4's figure includes the driver's own RSS (see _peak_rss_bytes);
    # the worker's report replaces it below.
    row.update(returncode=rc, peak_rss_bytes=maxrss)
    result = next(
        (json.loads(l[len(RESULT_TAG) :]) for l in stdout.splitlines() if l.startswith(RESULT_TAG)),
        None,
    )
    if result is not None:
        row.update(result)
        row["status"] = "ok"
    elif timed_out:
        row["status"] = f"timed out after {args.timeout:.0f} s (killed)"
    elif row.get("oom_kills"):
        row["status"] = "OOM-killed"
    else:
        lines = [l for l in stderr.strip().splitlines() if l.strip()]
        row["status"] = f"failed (exit {rc}): {lines[-1] if lines else 'no output'}"
    return row


def _median(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(name: str, runs: List[dict], tokens: int) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    s = {
        "name": name,
        "kind": runs[0]["kind"],
        "runs": len(runs),
        "ok_runs": len(ok),
        "status": "ok" if ok else runs[-1]["status"],
    }
    for r in ok:
        r["decode_tok_s"] = (len(r["tokens"]) - 1) / r["decode_s"] if r["decode_s"] > 0 else None
        r["decode_cpu_ms_per_tok"] = 1e3 * r["decode_cpu_s"] / (len(r["tokens"]) - 1)
    for key in (
        "decode_tok_s",
        "decode_cpu_ms_per_tok",
        "ttft_s",
        "load_s",
        "peak_rss_bytes",
        "cgroup_peak_bytes",
        "wall_s",
    ):
        s[key] = _median(
            ok if key not in ("peak_rss_bytes", "cgroup_peak_bytes", "wall_s") else runs, key
        )
    tps = [r["decode_tok_s"] for r in ok if r.get("decode_tok_s")]
    s["decode_tok_s_min"], s["decode_tok_s_max"] = (min(tps), max(tps)) if tps else (None, None)
    s["oom_kills"] = (
        sum(r.get("oom_kills") or 0 for r in runs) if any("oom_kills" in r for r in runs) else None
    )
    stats = [r["stats"] for r in ok if r.get("stats")]
    if stats:
        for key in (
            "hit_rate",
            "bytes_read",
            "fetch_latency_p50_ms",
            "fetch_latency_p99_ms",
            "evictions",
        ):
            s[key] = _median(stats, key)
        last = stats[-1]
        for key in ("budget_bytes", "slots_per_layer", "num_experts", "resident_bytes"):
            s[key] = last.get(key)
        if last.get("slots_per_layer") and last.get("num_experts"):
            s["residency"] = last["slots_per_layer"] / last["num_experts"]
    s["tokens"] = ok[0]["tokens"] if ok else None
    return s


def spread_note(rows: List[dict], reps: int) -> str:
    """How much decode tok/s moved between repetitions, or why it is unknown."""
    if reps < 2:
        return (
            "The spread between runs is not measured (1 repetition): "
            "another program on the cores during a run moves its result directly."
        )
    spreads = [
        ((r["decode_tok_s_max"] - r["decode_tok_s_min"]) / r["decode_tok_s"], r)
        for r in rows
        if r.get("decode_tok_s_min") and r.get("decode_tok_s")
    ]
    if not spreads:
        return (
            "No contender decoded in more than one repetition: the spread between runs is unknown."
        )
    worst, r = max(spreads, key=lambda x: x[0])
    return (
        f"Decode tok/s varied by up to {worst:.0%} of the median between repetitions "
        f"({r['name']}: {r['decode_tok_s_min']:.2f} to {r['decode_tok_s_max']:.2f} tok/s)."
    )


def quick_note(args, rows: List[dict], load: str) -> str:
    """--quick: a smoke run. Say so, how much it varied, and what to run instead."""
    return (
        f"Quick mode ({args.tokens} tokens, {args.reps} repetition(s), {args.warmup_tokens} warm-up "
        f"token(s)): results are indicative only, not for comparison; short runs vary a lot from run "
        f"to run. {spread_note(rows, args.reps)} Load average during the runs: {load}. "
        f"For numbers, run without --quick ({FULL['tokens']} tokens, {FULL['reps']} interleaved "
        "repetitions, medians)."
    )


def _load_average() -> str:
    try:
        one = os.getloadavg()[0]
    except OSError:
        return "unknown"
    return f"{one:.2f} (1 min) on {os.cpu_count()} cores"


def model_sizes(model: Path) -> Dict[str, int]:
    resident = sum(f.stat().st_size for f in model.glob("model*.safetensors"))
    experts = 0
    index = model / "experts" / "index.json"
    if index.exists():
        from ..layout import load_layout

        experts = load_layout(model / "experts").total_nbytes
    return {"resident_bytes": resident, "expert_bytes": experts}


def model_folder(value: str, what: str = "--model") -> Path:
    """--model as a folder on this machine (bench reads its files itself); a
    Hub id is downloaded first, as mlx_lm.load does. Raises ValueError."""
    from ..errors import ModelNotFoundError
    from ..loading import resolve_model_path

    try:
        return resolve_model_path(value)
    except ModelNotFoundError as e:
        raise ValueError(f"{what}: {e}") from None


def parse_limit(value: str, total: int) -> int:
    from ..budget import parse_budget

    return parse_budget(value, total)


# -- report -------------------------------------------------------------------------


def _gb(n):
    return "" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _f(x, fmt="{:.2f}"):
    return "" if x is None else fmt.format(x)


def _ratio(a, b):
    return a / b if a is not None and b else None


def markdown(meta: dict, rows: List[dict]) -> str:
    base = rows[0] if rows and rows[0]["kind"] in ("stock", "resident") else None
    llama = next((r for r in rows if r["kind"] == "llamacpp"), None)
    lines = [f"# {meta['title']}", ""]
    for k, v in meta["facts"].items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    head = [
        "contender",
        "status",
        "experts resident/layer",
        "decode tok/s",
        "TTFT s",
        "peak RSS",
        "decode CPU ms/tok",
    ]
    if base:
        head += ["decode vs resident", "TTFT vs resident", "RSS vs resident", "CPU/tok vs resident"]
    if meta.get("cgroup"):
        head += ["cgroup peak", "OOM kills"]
        if llama:
            head += ["decode vs llama.cpp"]
    head += ["hit rate", "bytes read", "fetch p50 ms", "fetch p99 ms", "same tokens as baseline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = (
            f"{r['slots_per_layer']}/{r['num_experts']} ({r['residency']:.0%})"
            if r.get("residency")
            else ("all" if r["kind"] in ("stock", "resident", "llamacpp") else "")
        )
        cells = [
            r["name"],
            r["status"],
            res,
            _f(r.get("decode_tok_s")),
            _f(r.get("ttft_s"), "{:.3f}"),
            _gb(r.get("peak_rss_bytes")),
            _f(r.get("decode_cpu_ms_per_tok"), "{:.2f}"),
        ]
        if base:
            cells += [
                _f(_ratio(r.get("decode_tok_s"), base.get("decode_tok_s")), "{:.3f}x"),
                _f(_ratio(r.get("ttft_s"), base.get("ttft_s")), "{:.3f}x"),
                _f(_ratio(r.get("peak_rss_bytes"), base.get("peak_rss_bytes")), "{:.3f}x"),
                _f(
                    _ratio(r.get("decode_cpu_ms_per_tok"), base.get("decode_cpu_ms_per_tok")),
                    "{:.3f}x",
                ),
            ]
        if meta.get("cgroup"):
            cells += [_gb(r.get("cgroup_peak_bytes")), _f(r.get("oom_kills"), "{}")]
            if llama:
                cells += [_f(_ratio(r.get("decode_tok_s"), llama.get("decode_tok_s")), "{:.2f}x")]
        same = (
            ""
            if not base
            or r is base
            or not r.get("tokens")
            or not base.get("tokens")
            or r["kind"] == "llamacpp"
            else ("yes" if r["tokens"] == base["tokens"] else "no")
        )
        cells += [
            _f(r.get("hit_rate"), "{:.3f}"),
            _gb(r.get("bytes_read")),
            _f(r.get("fetch_latency_p50_ms"), "{:.3f}"),
            _f(r.get("fetch_latency_p99_ms"), "{:.3f}"),
            same,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += meta.get("notes", [])
    return "\n".join(lines) + "\n"


def plot_series(rows: List[dict]) -> dict:
    """What the PNG draws: the odmoe curve (one point per budget) and the
    contenders with every expert resident, which are horizontal reference
    lines and never points of the curve."""
    pts = sorted(
        (r for r in rows if r["kind"] == "odmoe" and r.get("residency") and r.get("decode_tok_s")),
        key=lambda r: r["residency"],
    )
    return {
        "odmoe": [(100 * r["residency"], r["decode_tok_s"], r.get("hit_rate") or 0) for r in pts],
        "references": [
            (r["name"], r["decode_tok_s"])
            for r in rows
            if r["kind"] in ("stock", "resident", "llamacpp") and r.get("decode_tok_s")
        ],
    }


def plot(rows: List[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = plot_series(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [p[0] for p in series["odmoe"]]
    a1.plot(x, [p[1] for p in series["odmoe"]], "o-", label="odmoe")
    for (name, tok_s), ls in zip(series["references"], ("--", ":", "-.")):
        a1.axhline(tok_s, color="gray", ls=ls, label=f"{name} (all resident)")
    a1.set_xlabel("experts resident (% per layer)")
    a1.set_ylabel("decode tok/s")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    a2.plot(x, [p[2] for p in series["odmoe"]], "o-", color="tab:orange")
    a2.set_xlabel("experts resident (% per layer)")
    a2.set_ylabel("expert cache hit rate")
    a2.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _versions() -> str:
    from importlib.metadata import version

    out = []
    for pkg in ("mlx", "mlx-lm", "llama_cpp_python"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except Exception:
            pass
    return ", ".join(out)


def _machine() -> str:
    from ..budget import physical_memory

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {physical_memory() / 2**30:.1f} GiB RAM"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_arg", nargs="?", metavar="MODEL", help="The same as --model.")
    p.add_argument(
        "--model", help="odmoe model folder (sharded layout) or Hugging Face Hub id (org/name)."
    )
    p.add_argument(
        "--stock",
        help="Stock mlx-lm checkpoint of the same model: the all-resident baseline "
        "(default: the odmoe folder's experts in a MemoryStore).",
    )
    p.add_argument(
        "--gguf",
        help="GGUF of the same model: adds llama.cpp (llama-cpp-python, mmap) as a contender.",
    )
    p.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="Comma-separated odmoe budgets. Default: " + DEFAULT_BUDGETS.replace("%", "%%"),
    )
    p.add_argument("--tokens", type=int, help=f"Tokens per measured run. Default: {FULL['tokens']}")
    p.add_argument("--reps", type=int, help=f"Interleaved repetitions. Default: {FULL['reps']}")
    p.add_argument(
        "--warmup-tokens",
        type=int,
        help=f"Tokens decoded before each measured run. Default: {FULL['warmup_tokens']}",
    )
    p.add_argument("--prompt-file", help="Prompt text (default: a fixed Python snippet).")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        help="Keep only the prompt's first N tokens (slow CPUs, big models).",
    )
    p.add_argument(
        "--cold", action="store_true", help="Drop the page cache before every run (root)."
    )
    p.add_argument(
        "--cgroup-limit",
        help="Run each contender in a memory cgroup with this limit: bytes, '4GB', "
        "or '50%%' of the model's size on disk (root, cgroup v1). Implies --cold.",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="Seconds before a contender is killed. Default: 900",
    )
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores).")
    p.add_argument("--no-baseline", action="store_true", help="Skip the all-resident baseline.")
    p.add_argument(
        "--quick",
        action="store_true",
        help="Smoke run: 8 tokens, 1 repetition, 1 warm-up token unless given (indicative only).",
    )
    p.add_argument("--title", help="Title of the report.")
    p.add_argument("--out", default="bench-out", help="Output folder. Default: bench-out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.model and args.model_arg:
        p.error("give the model once: as MODEL or as --model")
    what = "--model" if args.model else "MODEL"
    args.model = args.model or args.model_arg
    if not args.model:
        p.error("--model is required")
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    try:
        model = model_folder(args.model, what)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.model = str(model)  # the contenders load the folder just resolved
    sizes = model_sizes(model)
    model_bytes = sizes["resident_bytes"] + sizes["expert_bytes"]
    cgroup_limit = None
    if args.cgroup_limit:
        from .cgroup import unavailable_reason

        reason = unavailable_reason()
        if reason:
            sys.exit(f"--cgroup-limit: {reason}")
        cgroup_limit = parse_limit(args.cgroup_limit, model_bytes)
    elif args.cold and os.geteuid() != 0:
        sys.exit("--cold drops the page cache, which needs root")

    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else PROMPT
    prompt_ids, warmup_ids = tok.encode(prompt), tok.encode(WARMUP_PROMPT)
    if args.prompt_tokens:
        prompt_ids = prompt_ids[: args.prompt_tokens]
    common = {
        "tokens": args.tokens,
        "warmup_tokens": args.warmup_tokens,
        "prompt_ids": prompt_ids,
        "warmup_ids": warmup_ids,
        "threads": args.threads,
        "n_ctx": len(prompt_ids) + args.tokens + 64,
    }
    specs = [dict(c, **common) for c in _contenders(args)]

    runs: Dict[str, List[dict]] = {s["name"]: [] for s in specs}
    load_start = _load_average()
    for rep in range(args.reps):
        for spec in specs:
            row = run_contender(spec, args, cgroup_limit)
            runs[spec["name"]].append(row)
            tps = (
                (len(row["tokens"]) - 1) / row["decode_s"]
                if row["status"] == "ok" and row["decode_s"] > 0
                else None
            )
            print(
                f"[{rep + 1}/{args.reps}] {spec['name']}: {row['status']}"
                + (f", {tps:.2f} tok/s, TTFT {row['ttft_s']:.3f} s" if tps else "")
                + f", peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB",
                flush=True,
            )
    rows = [summarize(s["name"], runs[s["name"]], args.tokens) for s in specs]

    base = (
        "stock mlx-lm on " + args.stock
        if args.stock
        else "the odmoe folder's experts read into a MemoryStore (all resident, no cache logic)"
    )
    facts = {
        "model": f"{model} ({_gb(sizes['resident_bytes'])} resident weights + {_gb(sizes['expert_bytes'])} routed experts)",
        "baseline (all experts resident)": base
        if specs and specs[0]["kind"] in ("stock", "resident")
        else "none",
        "machine": _machine(),
        "versions": _versions(),
        "run": f"{len(prompt_ids)} prompt tokens, {args.tokens} generated (greedy, EOS banned), "
        f"{args.warmup_tokens} warm-up tokens, {args.reps} interleaved repetition(s), medians",
        "page cache": "dropped before every run (cold)"
        if (args.cold or cgroup_limit)
        else "warm (files may be cached by the OS)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load average": f"{load_start} at the start, {_load_average()} at the end",
    }
    if cgroup_limit:
        facts["memory cgroup limit"] = (
            f"{_gb(cgroup_limit)} ({cgroup_limit / model_bytes:.0%} of the model's {_gb(model_bytes)})"
        )
    notes = [
        "Decode tok/s counts the tokens after the first; TTFT is prompt processing plus the first token. "
        "Decode CPU ms/tok is the process's user+system CPU time per decoded token (all threads): "
        "less sensitive than wall time to other programs competing for the cores, blind to waiting on disk. "
        "Peak RSS is the contender process's own high-water mark (VmHWM on Linux; load included). Hit rate, bytes read and fetch "
        "latency cover the measured run only (after warm-up)."
    ]
    variability = (
        quick_note(args, rows, facts["load average"])
        if args.quick
        else spread_note(rows, args.reps)
    )
    notes = [variability, ""] + notes
    meta = {
        "title": args.title or f"odmoe residency benchmark: {model.name}",
        "facts": facts,
        "cgroup": bool(cgroup_limit),
        "notes": notes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(meta, rows)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": rows,
                "runs": runs,
                "sizes": sizes,
                "cgroup_limit": cgroup_limit,
            },
            indent=1,
        )
    )
    png = plot(rows, out / "residency.png", meta["title"])
    print()
    print(report)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {png}" if png else " (no matplotlib: no plot)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
