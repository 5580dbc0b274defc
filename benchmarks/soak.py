"""Soak: generate thousands of tokens with experts streaming through a small
budget, inside a memory cgroup, and report the RSS curve and any error.

    sudo python benchmarks/soak.py --model models/tiny-qwen2-moe --tokens 5000

Writes soak.md and soak.png (with matplotlib) to --out.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def worker(args):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    import mlx_lm_odmoe

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    model, tok = mlx_lm_odmoe.load(args.model, expert_cache=args.budget)
    no_eos = lambda tokens, logits: logits.at[..., list(tok.eos_token_ids)].add(-1e9)  # noqa: E731
    t0, made = time.time(), 0
    while made < args.tokens:  # several requests, as a server would see
        n = min(1000, args.tokens - made)
        for i, r in enumerate(
            mlx_lm.stream_generate(
                model,
                tok,
                "import os\n",
                max_tokens=n,
                sampler=make_sampler(1.0),
                logits_processors=[no_eos],
            )
        ):
            if (made + i) % 100 == 0:
                print(
                    json.dumps({"tokens": made + i, "rss": rss(), "t": time.time() - t0}),
                    flush=True,
                )
        made += n
    s = mlx_lm_odmoe.stats(model)
    print(
        json.dumps(
            {
                "done": made,
                "rss": rss(),
                "t": time.time() - t0,
                "hit_rate": s["hit_rate"],
                "misses": s["misses"],
                "bytes_read": s["bytes_read"],
            }
        ),
        flush=True,
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="models/tiny-qwen2-moe")
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--budget", default="min")
    p.add_argument("--memory-limit-mb", type=int, default=1024, help="cgroup limit (0: no cgroup)")
    p.add_argument("--out", default="bench-out/soak")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from mlx_lm_odmoe.tools.cgroup import MemoryCgroup, unavailable_reason

    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--budget",
        args.budget,
    ]
    cg = None
    if args.memory_limit_mb:
        reason = unavailable_reason()
        if reason:
            sys.exit(f"cannot run inside a memory cgroup: {reason} (or pass --memory-limit-mb 0)")
        cg = MemoryCgroup(args.memory_limit_mb * 2**20)
        proc = cg.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    samples = [r for r in rows if "tokens" in r]
    final = next((r for r in rows if "done" in r), None)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Soak: {args.model}, budget {args.budget}, {args.tokens} tokens",
        f"cgroup limit: {args.memory_limit_mb} MiB" if cg else "no cgroup",
        "",
    ]
    if cg:
        lines.append(
            f"cgroup peak usage: {cg.peak_bytes / 2**20:.1f} MiB, OOM kills: {cg.oom_kills}"
        )
        cg.close()
    lines.append(f"exit code: {proc.returncode}")
    if proc.returncode != 0:
        lines.append(f"error: {err.strip()[-2000:]}")
    if samples:
        first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
        lines.append(
            f"RSS after {first['tokens']} tokens: {first['rss'] / 2**20:.1f} MiB; after "
            f"{last['tokens']}: {last['rss'] / 2**20:.1f} MiB (growth {(last['rss'] - first['rss']) / 2**20:.1f} MiB)"
        )
    if final:
        lines.append(
            f"{final['done']} tokens in {final['t']:.1f} s ({final['done'] / final['t']:.1f} tok/s), "
            f"hit rate {final['hit_rate']:.3f}, {final['bytes_read'] / 1e6:.1f} MB of experts read"
        )
    report = "\n".join(lines)
    (outdir / "soak.md").write_text(report + "\n")
    print(report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s["tokens"] for s in samples], [s["rss"] / 2**20 for s in samples])
        ax.set_xlabel("tokens generated")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Soak RSS, budget {args.budget}")
        fig.tight_layout()
        fig.savefig(outdir / "soak.png", dpi=100)
        print(f"plot: {outdir / 'soak.png'}")
    except ImportError:
        print("(install matplotlib for the plot)")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
