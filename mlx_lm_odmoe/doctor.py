"""Forecast how an MoE model will run on this machine, before loading it.

    mlx_lm_odmoe.doctor models/tiny-qwen2-moe
    mlx_lm_odmoe.doctor ./qwen-moe-odmoe --memory 16GB --context 8192
    mlx_lm_odmoe.doctor --config tests/data/kimi-k2.5.config.json --memory 128GB

Reads config.json, experts/index.json and safetensors headers only, never
the weights. With --config (a Hugging Face config.json, no weights needed)
the sizes are what `mlx_lm_odmoe.convert -q` would write: --bits-bit
weights in groups of --group-size with --scale-bytes scales and biases.

Memory: resident weights + expert budget + KV cache must fit in --memory
less --headroom. The budget is --budget if given, else the default rule
(all experts if they take at most half of memory, else half), capped by
what is left. Residency r = budget / all routed experts.

Decode speed, per token:

    t = A / C  +  L * k * (1 - h) * R / B  +  L * s

    A  bytes of weights one token reads: resident weights (less the
       embedding table, of which one row is read) plus k experts per MoE layer
    C  compute throughput over quantized weights, bytes/s, measured with a
       short timed 4-bit matrix-vector product (float32 activations)
    L  MoE layers;  k  experts per token;  R  bytes per expert
    h  expected hit rate, taken as r (uniform routing; real routers are
       skewed, so real hit rates are usually higher)
    B  disk read bandwidth, bytes/s, measured with a short timed read of an
       expert shard bypassing the page cache (O_DIRECT)
    s  host round trip per MoE layer (the block syncs once per layer when
       not every expert is resident; 0 when all are)

and tok/s = 1 / t. It is a forecast from two micro-measurements, not a
benchmark: run mlx_lm_odmoe.bench for measured numbers.
"""

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from .budget import MINIMUM, parse_budget, physical_memory
from .layout import EXPERTS_DIR, INDEX_NAME, load_layout, read_safetensors_header

MIN_PROBE_BYTES = 64 * 2**20  # smaller files time the call, not the disk
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- sizes ------------------------------------------------------------------------


def _text(config: dict) -> dict:
    from conversion.sources import text_config

    return text_config(config)


def _tensor_bytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def sizes_from_folder(model: Path) -> Dict:
    """Resident and expert bytes from headers and the expert index."""
    config = _text(json.loads((model / "config.json").read_text()))
    resident, stacked = 0, 0
    for f in sorted(model.glob("model*.safetensors")):
        header, _ = read_safetensors_header(f)
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if ".switch_mlp." in k or ".mlp.experts." in k:
                stacked += _tensor_bytes(v)
            else:
                resident += _tensor_bytes(v)
    index = model / EXPERTS_DIR / INDEX_NAME
    if index.exists():
        layout = load_layout(model / EXPERTS_DIR)
        experts, record, layers, E = layout.total_nbytes, layout.record_nbytes, len(layout.moe_layers), layout.num_experts
        shard = max((model / EXPERTS_DIR / s["file"] for s in layout.shards), key=lambda p: p.stat().st_size)
    elif stacked:
        E = config.get("num_experts") or config["n_routed_experts"]
        layers = len(_moe_layers(config))
        experts, record = stacked, stacked // (E * layers)
        shard = max(model.glob("model*.safetensors"), key=lambda p: p.stat().st_size)
    else:
        raise ValueError(f"{model}: no experts/index.json and no stacked experts: not an MoE model folder")
    return {"config": config, "resident_bytes": resident, "expert_bytes": experts, "record_bytes": record,
            "moe_layers": layers, "num_experts": E, "embedding_bytes": _embedding_bytes(model),
            "probe_file": shard, "kv_bytes": _float_bytes(config)}


def check_folder(model: Path) -> None:
    """Run the checks mlx-lm's load runs on the expert files (the index,
    every shard's size and header, their shapes against config.json),
    reading no expert: a folder that would not load fails here. Raises
    LayoutError (a ValueError) naming the file and the fix."""
    from mlx_lm.utils import load_config

    from .loading import odmoe_model_config
    from .runtime import ExpertRuntime

    raw = load_config(model)
    config = _text(raw)
    moe_layers = _moe_layers(config)
    expected = {"num_experts": config.get("num_experts") or config["n_routed_experts"], "moe_layers": moe_layers,
                "hidden_size": config["hidden_size"], "moe_intermediate_size": config["moe_intermediate_size"]}
    settings = odmoe_model_config(model, raw)["odmoe"]
    runtime = ExpertRuntime(settings, config["num_experts_per_tok"], config["num_hidden_layers"], expected)
    runtime.validate()


def _embedding_bytes(model: Path) -> int:
    n = 0
    for f in model.glob("model*.safetensors"):
        header, _ = read_safetensors_header(f)
        n += sum(_tensor_bytes(v) for k, v in header.items() if "embed_tokens." in k)
    return n


def _float_bytes(config: dict) -> int:
    return _DTYPE_BYTES.get(config.get("torch_dtype"), 2)


def _moe_layers(config: dict):
    from conversion.convert import ODMOE_TYPES, build_skeleton, odmoe_config

    converted = config.get("model_type") in ODMOE_TYPES.values()
    model = build_skeleton(dict(config) if converted else odmoe_config(config))
    return [i for i, layer in enumerate(model.model.layers) if "switch_mlp" in layer.mlp]


def sizes_from_config(config: dict, bits: int, group_size: int, scale_bytes: int, float_bytes: int) -> Dict:
    """What a -q conversion of ``config`` would weigh. The parameter shapes
    come from mlx-lm's own model class, built lazily (nothing is allocated)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from conversion.convert import build_skeleton, odmoe_config

    config = _text(config)
    for k in ("quantization_config", "quantization"):
        config.pop(k, None)
    model = build_skeleton(odmoe_config(config))
    moe_layers = [i for i, layer in enumerate(model.model.layers) if "switch_mlp" in layer.mlp]
    quantizable = {name for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0}

    def nbytes(n_params: int, quantized: bool) -> int:
        if quantized:
            return n_params * bits // 8 + 2 * (n_params // group_size) * scale_bytes
        return n_params * float_bytes

    resident = embedding = 0
    for k, v in tree_flatten(model.parameters()):
        module, _, part = k.rpartition(".")
        b = nbytes(v.size, part == "weight" and module in quantizable)
        resident += b
        if "embed_tokens" in k:
            embedding += b
    D, inter = config["hidden_size"], config["moe_intermediate_size"]
    record = sum(nbytes(rows * cols, cols % group_size == 0) for rows, cols in ((inter, D), (inter, D), (D, inter)))
    E = config.get("num_experts") or config["n_routed_experts"]
    return {"config": config, "resident_bytes": resident, "expert_bytes": record * E * len(moe_layers),
            "record_bytes": record, "moe_layers": len(moe_layers), "num_experts": E,
            "embedding_bytes": embedding, "probe_file": None, "kv_bytes": float_bytes}


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """mlx-lm's cache: K and V per head (qwen2_moe); MLA's latent plus its
    rope key (deepseek_v3 / Kimi)."""
    L = config["num_hidden_layers"]
    if config.get("kv_lora_rank"):
        return L * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * dtype_bytes
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return L * 2 * config.get("num_key_value_heads", heads) * head_dim * dtype_bytes


# -- probes -----------------------------------------------------------------------


def disk_bandwidth(path: Optional[Path], nbytes: int = 256 * 2**20) -> Dict:
    """Bytes/s of a sequential read of ``path`` that bypasses the page cache
    (O_DIRECT). Without a file, a temporary one is written and read back."""
    tmp = None
    if path is None or path.stat().st_size < MIN_PROBE_BYTES:
        fd, tmp = tempfile.mkstemp(prefix="odmoe-doctor-")
        chunk = os.urandom(2**20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        path = Path(tmp)
    try:
        out = _timed_read(path, nbytes)
        if tmp:
            out["file"] = "a temporary file just written (a device cache may serve it: --disk-gbps overrides)"
        return out
    finally:
        if tmp:
            os.unlink(tmp)


def _timed_read(path: Path, nbytes: int) -> Dict:
    block = 16 * 2**20
    size = min(nbytes, path.stat().st_size)
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        how = "O_DIRECT"
    except OSError:
        fd, how = os.open(path, os.O_RDONLY), "buffered (page cache dropped for the file)"
    try:
        if how != "O_DIRECT" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done, t0 = 0, time.perf_counter()
        while done < size:
            try:
                n = os.preadv(fd, [buf], done)
            except OSError:  # O_DIRECT refused by this file system
                os.close(fd)
                fd, how = os.open(path, os.O_RDONLY), "buffered"
                n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            done += n
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return {"bytes_per_s": done / dt if dt > 0 else None, "bytes": done, "seconds": dt, "how": how, "file": str(path)}


def compute_bandwidth(seconds: float = 0.5) -> Dict:
    """Weight bytes/s of a 4-bit matrix-vector product, as decode does."""
    import mlx.core as mx

    D, N = 4096, 8192
    w = mx.random.normal((N, D), dtype=mx.float32) * 0.02
    wq, s, b = mx.quantize(w, 64, 4)
    x = mx.random.normal((1, D), dtype=mx.float32)
    mx.eval(wq, s, b, x)
    nbytes = wq.nbytes + s.nbytes + b.nbytes
    mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4))  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        y = x
        for _ in range(8):  # a chain, like layers: each waits for the last
            y = mx.quantized_matmul(x + y[:, :1] * 0, wq, s, b, transpose=True, group_size=64, bits=4)[:, :D]
        mx.eval(y)
        n += 8
    dt = time.perf_counter() - t0
    return {"bytes_per_s": n * nbytes / dt, "device": str(mx.default_device())}


def sync_cost(repeats: int = 200) -> float:
    """Seconds of one host round trip (evaluate, copy ids to numpy)."""
    import mlx.core as mx
    import numpy as np

    x = mx.zeros((1, 4), dtype=mx.int32)
    mx.eval(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        x = x + 1
        np.array(x)
    return (time.perf_counter() - t0) / repeats


# -- forecast ---------------------------------------------------------------------


def forecast(sizes: Dict, memory: int, budget_spec=None, context: int = 4096, headroom: int = 2**30,
             disk_bps: Optional[float] = None, compute_bps: Optional[float] = None,
             sync_s: float = 0.0) -> Dict:
    config = sizes["config"]
    top_k = config["num_experts_per_tok"]
    R, L, E = sizes["record_bytes"], sizes["moe_layers"], sizes["num_experts"]
    experts, resident = sizes["expert_bytes"], sizes["resident_bytes"]
    kv_tok = kv_bytes_per_token(config, sizes["kv_bytes"])
    kv = kv_tok * context
    left = memory - headroom - resident - kv
    minimum = top_k * R * L
    if budget_spec is not None:
        budget = parse_budget(budget_spec, experts)
        budget = minimum if budget == MINIMUM else budget
    else:
        budget = max(0, min(experts, memory // 2, left))  # the loader's default rule, for this memory
    slots = min(E, budget // (R * L)) if R and L else 0
    r = slots / E if E else 0.0
    out = {
        "resident_bytes": resident, "expert_bytes": experts, "expert_record_bytes": R, "moe_layers": L,
        "num_experts": E, "top_k": top_k, "kv_bytes_per_1k_tokens": kv_tok * 1000, "context": context,
        "kv_bytes": kv, "memory": memory, "headroom": headroom, "budget_bytes": budget,
        "min_budget_bytes": minimum, "slots_per_layer": int(slots), "residency": r,
        "fits_entirely": resident + experts + kv <= memory - headroom,
        "runs": slots >= top_k and resident + slots * R * L + kv <= memory - headroom,
        "memory_use_bytes": resident + int(slots) * R * L + kv,
    }
    if disk_bps and compute_bps and out["runs"]:
        active = resident - sizes.get("embedding_bytes", 0) + top_k * R * L
        h = r
        t_compute = active / compute_bps
        t_disk = L * top_k * (1 - h) * R / disk_bps
        t_sync = 0.0 if slots == E else L * sync_s
        out.update(active_bytes_per_token=active, expected_hit_rate=h, t_compute_s=t_compute,
                   t_disk_s=t_disk, t_sync_s=t_sync, tok_s=1.0 / (t_compute + t_disk + t_sync),
                   tok_s_all_resident=1.0 / t_compute)
    return out


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report(name: str, f: Dict, probes: Dict) -> str:
    lines = [f"odmoe doctor: {name}", ""]
    lines.append(f"  resident weights      {_gb(f['resident_bytes'])}")
    lines.append(f"  routed experts        {_gb(f['expert_bytes'])}  ({f['moe_layers']} MoE layers x "
                 f"{f['num_experts']} experts x {_gb(f['expert_record_bytes'])}, top-{f['top_k']})")
    lines.append(f"  KV cache              {_gb(f['kv_bytes_per_1k_tokens'])} per 1k tokens; "
                 f"{_gb(f['kv_bytes'])} at {f['context']} tokens")
    lines.append(f"  memory                {_gb(f['memory'])} (less {_gb(f['headroom'])} headroom)")
    lines.append("")
    if f["fits_entirely"]:
        lines.append("  fits entirely: every expert can stay resident (no disk reads while decoding)")
    elif f["runs"]:
        lines.append("  does not fit entirely: experts stream from disk through the budget")
    else:
        lines.append(f"  does NOT run in this memory: resident weights + KV + the minimum expert budget "
                     f"({_gb(f['min_budget_bytes'])}) exceed it")
    lines.append(f"  expert budget         {_gb(f['budget_bytes'])} -> {f['slots_per_layer']}/{f['num_experts']} "
                 f"experts per layer ({f['residency']:.1%} residency); minimum {_gb(f['min_budget_bytes'])}")
    lines.append(f"  forecast memory use   {_gb(f['memory_use_bytes'])} (resident + budget + KV)")
    if probes.get("disk"):
        d = probes["disk"]
        lines.append(f"  disk read             {d['bytes_per_s'] / 1e6:.0f} MB/s ({_gb(d['bytes'])} {d['how']} read of {d['file']})")
    if probes.get("compute"):
        lines.append(f"  compute               {probes['compute']['bytes_per_s'] / 1e9:.2f} GB/s of 4-bit weights "
                     f"({probes['compute']['device']})")
    if "tok_s" in f:
        lines.append(f"  host sync per layer   {probes.get('sync_s', 0) * 1e6:.0f} us")
        lines.append("")
        lines.append(f"  per token: {_gb(f['active_bytes_per_token'])} of weights -> {f['t_compute_s'] * 1e3:.1f} ms compute, "
                     f"{f['t_disk_s'] * 1e3:.1f} ms disk (hit rate ~{f['expected_hit_rate']:.2f}), "
                     f"{f['t_sync_s'] * 1e3:.1f} ms sync")
        lines.append(f"  expected decode       {f['tok_s']:.2f} tok/s (all experts resident: {f['tok_s_all_resident']:.2f} tok/s)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="mlx_lm_odmoe.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="odmoe model folder (or a stock mlx-lm MoE checkpoint).")
    p.add_argument("--config", help="A Hugging Face config.json of a model not on disk (sizes assume a -q conversion).")
    p.add_argument("--memory", help="Memory to plan for: '24GB', '16GiB', bytes. Default: this machine's physical memory.")
    p.add_argument("--budget", help="Expert budget to forecast ('8GB', '25%%', 'min'). Default: the loader's default rule.")
    p.add_argument("--context", type=int, default=4096, help="Tokens of KV cache to plan for. Default: 4096")
    p.add_argument("--headroom", default="1GiB", help="Memory kept free for the OS and activations. Default: 1GiB")
    p.add_argument("--bits", type=int, default=4, help="--config: expert and weight bits. Default: 4")
    p.add_argument("--group-size", type=int, default=64, help="--config: quantization group size. Default: 64")
    p.add_argument("--scale-bytes", type=int, default=2, choices=(2, 4),
                   help="--config: bytes per scale/bias (2: float16/bfloat16, 4: float32 as on MLX's CPU). Default: 2")
    p.add_argument("--dtype-bytes", type=int, default=2, choices=(2, 4),
                   help="--config: bytes of unquantized weights and the KV cache. Default: 2")
    p.add_argument("--disk-gbps", type=float, help="Disk read GB/s to assume instead of measuring.")
    p.add_argument("--compute-gbps", type=float, help="4-bit weight GB/s to assume instead of measuring.")
    p.add_argument("--probe-mb", type=int, default=256, help="Bytes of the timed disk read, in MB. Default: 256")
    p.add_argument("--no-probe", action="store_true", help="Sizes only: no timed reads or matmuls.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.config):
        p.error("give a model folder or --config, not both")

    try:
        if args.model:
            sizes = sizes_from_folder(Path(args.model))
            check_folder(Path(args.model))
            name = args.model
        else:
            cfg = json.loads(Path(args.config).read_text())
            sizes = sizes_from_config(cfg, args.bits, args.group_size, args.scale_bytes, args.dtype_bytes)
            name = f"{args.config} (as a {args.bits}-bit, group {args.group_size} conversion)"
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.model:
            print("error: mlx_lm.load would refuse this folder too; no forecast made", file=sys.stderr)
        return 2
    memory = parse_budget(args.memory, physical_memory()) if args.memory else physical_memory()
    headroom = parse_budget(args.headroom, memory)

    probes = {}
    if not args.no_probe:
        if args.disk_gbps is None:
            probes["disk"] = disk_bandwidth(sizes["probe_file"], args.probe_mb * 2**20)
        if args.compute_gbps is None:
            probes["compute"] = compute_bandwidth()
        probes["sync_s"] = sync_cost()
    disk = args.disk_gbps * 1e9 if args.disk_gbps else (probes.get("disk") or {}).get("bytes_per_s")
    compute = args.compute_gbps * 1e9 if args.compute_gbps else (probes.get("compute") or {}).get("bytes_per_s")
    f = forecast(sizes, memory, args.budget, args.context, headroom, disk, compute, probes.get("sync_s", 0.0))
    if args.json:
        print(json.dumps({"forecast": f, "probes": probes}, indent=1, default=str))
    else:
        print(report(name, f, probes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
