"""Expert read throughput with a cold page cache, against raw sequential reads.

    sudo python benchmarks/read_throughput.py --model bench-data/qwen-moe-synth

For the experts of the first expert shard, alternately (page cache dropped
before each run):

  dd      `dd if=SHARD of=/dev/null bs=16M` (buffered, or --direct for
          iflag=direct): the disk's sequential read speed on the same bytes;
  reader  every expert of those layers read by the store's reader through a
          thread pool, as misses are (pread + crc32 check), no copies;
  warm    CachedStore.warm() of those layers: reads plus the copies into the
          cache's pools, what loading with a full budget does.

Prints MB/s of each (median of --reps) and the ratio to dd; --out writes a
markdown table.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def run_dd(shard: Path, direct: bool) -> float:
    cmd = ["dd", f"if={shard}", "of=/dev/null", "bs=16M"] + (["iflag=direct"] if direct else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    dt = time.perf_counter() - t0
    m = re.search(r"^(\d+) bytes", p.stderr, re.M)
    return int(m.group(1)) / dt


def shard_layers(layout, shard: int):
    return [l for l in layout.moe_layers if all(s == shard for s, _, _ in layout.locations[l])]


def run_reader(model: Path, layers, threads: int) -> float:
    from mlx_lm_odmoe.store import ShardedFolderReader

    reader = ShardedFolderReader(model)
    jobs = [(l, e) for l in layers for e in range(reader.layout.num_experts)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(len(b) for b in pool.map(lambda le: reader.read(*le), jobs))
    dt = time.perf_counter() - t0
    reader.close()
    return n / dt


def run_warm(model: Path, layers, threads: int) -> float:
    from mlx_lm_odmoe.store import CachedStore, ShardedFolderReader

    reader = ShardedFolderReader(model)
    layout = reader.layout
    store = CachedStore(reader, layout.num_experts, threads=threads)
    t0 = time.perf_counter()
    store.warm(layers)
    dt = time.perf_counter() - t0
    store.close()
    return layout.record_nbytes * layout.num_experts * len(layers) / dt


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="odmoe model folder (sharded layout)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=4, help="Reader threads (the store's default: 4)")
    p.add_argument(
        "--direct", action="store_true", help="dd with iflag=direct (O_DIRECT) instead of buffered"
    )
    p.add_argument("--out", help="Write read_throughput.md and .json into this folder")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("dropping the page cache needs root")

    from mlx_lm_odmoe.layout import load_layout

    model = Path(args.model)
    layout = load_layout(model / "experts")
    layers = shard_layers(layout, 0)
    if not layers:
        sys.exit("no layer lies wholly in the first shard")
    shard = model / "experts" / layout.shards[0]["file"]
    nbytes = layout.record_nbytes * layout.num_experts * len(layers)
    results = {"dd": [], "reader": [], "warm": []}
    for _ in range(args.reps):
        for name, fn in (
            ("dd", lambda: run_dd(shard, args.direct)),
            ("reader", lambda: run_reader(model, layers, args.threads)),
            ("warm", lambda: run_warm(model, layers, args.threads)),
        ):
            drop_caches()
            results[name].append(fn())
            print(f"{name}: {results[name][-1] / 1e6:.0f} MB/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    lines = [
        "# Expert read throughput, cold page cache",
        "",
        f"- model: {model}; shard {shard.name} ({shard.stat().st_size / 1e9:.2f} GB), "
        f"{len(layers)} layers x {layout.num_experts} experts x {layout.record_nbytes / 1e6:.2f} MB = {nbytes / 1e9:.2f} GB",
        f"- dd: `dd if=SHARD of=/dev/null bs=16M{' iflag=direct' if args.direct else ''}`; reader threads: {args.threads}; "
        f"{args.reps} alternating repetitions, page cache dropped before each run, medians",
        "",
        "| read | MB/s (median) | all runs | vs dd |",
        "|---|---|---|---|",
    ]
    for k, v in results.items():
        lines.append(
            f"| {k} | {med[k] / 1e6:.0f} | {', '.join(f'{x / 1e6:.0f}' for x in v)} | {med[k] / med['dd']:.2f}x |"
        )
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "read_throughput.md").write_text(report)
        (out / "read_throughput.json").write_text(
            json.dumps({"bytes_per_s": results, "median": med}, indent=1)
        )


if __name__ == "__main__":
    main()
