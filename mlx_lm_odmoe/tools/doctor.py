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

    t = max(A / C,  L * k * (1 - h) * R / B)  +  T

    A  bytes of weights one token reads: resident weights (less the
       embedding table, of which one row is read) plus k experts per MoE layer
    C  compute throughput over the experts' weights, bytes/s, measured with
       a short timed matrix-vector product, 4-bit or float32 as the
       experts are (float32 activations)
    T  what a token costs besides reading weights: mlx-lm's decode loop,
       every layer's kernel launches and, when not every expert is
       resident, the router's host sync and the store's bookkeeping per
       MoE layer. Measured by decoding with the model's narrow twin: the
       same layers, ops and routing with every width cut to 64 (at most 64
       experts, the same share resident), written to a temporary folder and
       run by mlx-lm and this package. On small models T is most of t.
    L  MoE layers;  k  experts per token;  R  bytes per expert
    h  expected hit rate: from earlier runs' routes where the folder has
       warm-start counts (the share of routes to each layer's most used
       experts that fit), else taken as r (uniform routing; real routers are
       skewed, so real hit rates are usually higher)
    B  disk read bandwidth, bytes/s, measured with a short timed read of an
       expert shard bypassing the page cache (O_DIRECT)

The store overlaps the two terms (resident experts compute while misses
are read, each miss as it lands), hence the max. tok/s = 1 / t. It is a forecast from three short measurements, not a
benchmark: run mlx_lm_odmoe.bench for measured numbers. How it compared
with measurements is in benchmarks/results/doctor-forecast.md; the report
prints the range.
"""

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

from ..block import moe_layers_of
from ..budget import MINIMUM, default_budget, parse_budget, physical_memory, slots_that_fit
from ..layout import EXPERTS_DIR, INDEX_NAME, load_layout, read_safetensors_header
from ..model_types import STOCK_TYPE_OF, is_odmoe_type

MIN_PROBE_BYTES = 64 * 2**20  # smaller files time the call, not the disk
# Measured decode / this forecast on the checks in
# benchmarks/results/doctor-forecast.md; update both together.
TRUST = (
    "measured decode was 0.74-1.31x this forecast on the shipped models (page cache) and "
    "0.93-1.69x on I/O-bound models (experts streamed from disk, hit rate from earlier runs' "
    "counts; without counts the uniform hit rate makes it several times too low): "
    "measure with mlx_lm_odmoe.bench or benchmarks/io_bound.py"
)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- sizes ------------------------------------------------------------------------


def _text(config: dict) -> dict:
    from mlx_lm_odmoe.conversion.sources import text_config

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
        experts, record, layers, E = (
            layout.total_nbytes,
            layout.record_nbytes,
            len(layout.moe_layers),
            layout.num_experts,
        )
        shard = max(
            (model / EXPERTS_DIR / s["file"] for s in layout.shards), key=lambda p: p.stat().st_size
        )
        quantized = bool(layout.quantization)
    elif stacked:
        E = config.get("num_experts") or config["n_routed_experts"]
        layers = len(_moe_layers(config))
        experts, record = stacked, stacked // (E * layers)
        shard = max(model.glob("model*.safetensors"), key=lambda p: p.stat().st_size)
        quantized = bool(config.get("quantization"))
    else:
        raise ValueError(
            f"{model}: no experts/index.json and no stacked experts: not an MoE model folder"
        )
    return {
        "config": config,
        "resident_bytes": resident,
        "expert_bytes": experts,
        "record_bytes": record,
        "moe_layers": layers,
        "num_experts": E,
        "embedding_bytes": _embedding_bytes(model),
        "probe_file": shard,
        "kv_bytes": _float_bytes(config),
        "experts_quantized": quantized,
    }


def check_folder(model: Path) -> None:
    """Run the checks mlx-lm's load runs on the expert files (the index,
    every shard's size and header, their shapes against config.json),
    reading no expert: a folder that would not load fails here. Raises
    LayoutError (a ValueError) naming the file and the fix."""
    _runtime(model).validate()


def _runtime(model: Path, **settings):
    """The ExpertRuntime mlx-lm's load would build for ``model``, store unopened."""
    from mlx_lm.utils import load_config

    from ..loading import odmoe_model_config
    from ..runtime import ExpertRuntime

    raw = load_config(model)
    config = _text(raw)
    expected = {
        "num_experts": config.get("num_experts") or config["n_routed_experts"],
        "moe_layers": _moe_layers(config),
        "hidden_size": config["hidden_size"],
        "moe_intermediate_size": config["moe_intermediate_size"],
    }
    odmoe = odmoe_model_config(model, raw, model_config={"odmoe": settings})["odmoe"]
    return ExpertRuntime(
        odmoe, config["num_experts_per_tok"], config["num_hidden_layers"], expected
    )


def _embedding_bytes(model: Path) -> int:
    n = 0
    for f in model.glob("model*.safetensors"):
        header, _ = read_safetensors_header(f)
        n += sum(_tensor_bytes(v) for k, v in header.items() if "embed_tokens." in k)
    return n


def _float_bytes(config: dict) -> int:
    return _DTYPE_BYTES.get(config.get("torch_dtype"), 2)


def _moe_layers(config: dict):
    from mlx_lm_odmoe.conversion.convert import build_skeleton, odmoe_config

    converted = is_odmoe_type(config.get("model_type"))
    model = build_skeleton(dict(config) if converted else odmoe_config(config))
    return moe_layers_of(model)


def sizes_from_config(
    config: dict, bits: int, group_size: int, scale_bytes: int, float_bytes: int
) -> Dict:
    """What a -q conversion of ``config`` would weigh. The parameter shapes
    come from mlx-lm's own model class, built lazily (nothing is allocated)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_lm_odmoe.conversion.convert import build_skeleton, odmoe_config

    config = _text(config)
    for k in ("quantization_config", "quantization"):
        config.pop(k, None)
    model = build_skeleton(odmoe_config(config))
    moe_layers = moe_layers_of(model)
    quantizable = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0
    }

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
    record = sum(
        nbytes(rows * cols, cols % group_size == 0)
        for rows, cols in ((inter, D), (inter, D), (D, inter))
    )
    E = config.get("num_experts") or config["n_routed_experts"]
    return {
        "config": config,
        "resident_bytes": resident,
        "expert_bytes": record * E * len(moe_layers),
        "record_bytes": record,
        "moe_layers": len(moe_layers),
        "num_experts": E,
        "embedding_bytes": embedding,
        "probe_file": None,
        "kv_bytes": float_bytes,
    }


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
            out["file"] = (
                "a temporary file just written (a device cache may serve it: --disk-gbps overrides)"
            )
        return out
    finally:
        if tmp:
            os.unlink(tmp)


def miss_bandwidth(
    model: Path, misses: int, seconds: float = 1.0, max_bytes: int = 512 * 2**20
) -> Dict:
    """Bytes/s of the store's miss path on this folder's own expert records:
    CachedStore fetching ``misses`` experts that are not resident, each read
    cold (the page cache dropped, as MLX_LM_ODMOE_DROP_PAGE_CACHE=1 does) by
    its read threads and installed into the layer's pool."""
    import mlx.core as mx
    import numpy as np

    from ..store import CachedStore

    runtime = _runtime(model, drop_page_cache=True)
    reader = runtime._base_reader()  # the reader the loader would open, page cache dropped
    layout = reader.layout
    _drop_page_cache(model)
    store = CachedStore(reader, misses, threads=runtime.settings.read_threads)
    layer, E = layout.moe_layers[0], layout.num_experts
    try:
        done, spent, start = 0, 0.0, 0
        while spent < seconds and done < max_bytes and start < 64 * E:
            experts = np.arange(start, start + misses) % E  # never the ones just read
            t0 = time.perf_counter()
            pool, _ = store.fetch(layer, experts)
            mx.eval(*pool.values())
            if start:  # the first fetch also allocates the pool
                spent += time.perf_counter() - t0
                done += misses * layout.record_nbytes
            start += misses
    finally:
        store.close()
    return {
        "bytes_per_s": done / spent if spent else None,
        "bytes": done,
        "seconds": spent,
        "misses_per_fetch": misses,
        "record_bytes": layout.record_nbytes,
    }


def _drop_page_cache(model: Path):
    if not hasattr(os, "posix_fadvise"):
        return
    for f in (
        (model / EXPERTS_DIR).glob("*.safetensors")
        if (model / EXPERTS_DIR).is_dir()
        else model.glob("model*.safetensors")
    ):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
    return {
        "bytes_per_s": done / dt if dt > 0 else None,
        "bytes": done,
        "seconds": dt,
        "how": how,
        "file": str(path),
    }


def compute_bandwidth(seconds: float = 0.8, quantized: bool = True) -> Dict:
    """Weight bytes/s of a matrix-vector product as decode does it, 4-bit
    or float32 as the model's experts are: the median of short timed
    chains, so a moment of competition for the cores does not decide it."""
    import mlx.core as mx

    D, N = 4096, 8192
    w = mx.random.normal((N, D), dtype=mx.float32) * 0.02
    x = mx.random.normal((1, D), dtype=mx.float32)
    if quantized:
        wq, s, b = mx.quantize(w, 64, 4)
        nbytes = wq.nbytes + s.nbytes + b.nbytes

        def matvec(v):
            return mx.quantized_matmul(v, wq, s, b, transpose=True, group_size=64, bits=4)

        mx.eval(wq, s, b, x)
    else:
        nbytes = w.nbytes

        def matvec(v):
            return v @ w.T

        mx.eval(w, x)
    mx.eval(matvec(x))  # warm
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0, y = time.perf_counter(), x
        for _ in range(2):  # a chain, like layers: each waits for the last
            y = matvec(x + y[:, :1] * 0)[:, :D]
        mx.eval(y)
        rates.append(2 * nbytes / (time.perf_counter() - t0))
    return {
        "bytes_per_s": statistics.median(rates),
        "device": str(mx.default_device()),
        "weights": "4-bit" if quantized else "float32",
    }


# Below this float32 matmul speed on a CPU device, prompts are held back by
# the BLAS MLX was linked with (Linux wheels bundle the reference BLAS:
# ~2-5 GFLOP/s on 2 cores, against ~30-130 with OpenBLAS).
SLOW_BLAS_GFLOPS = 10.0


def matmul_gflops(seconds: float = 0.3) -> Dict:
    """float32 GFLOP/s of a prompt-sized matmul ([512, 1024] @ [1024, 1024]):
    what prefill's expert matmuls run at on this device."""
    import mlx.core as mx

    a = mx.random.normal((512, 1024))
    b = mx.random.normal((1024, 1024))
    mx.eval(a @ b)
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        mx.eval(a @ b)
        rates.append(2 * 512 * 1024 * 1024 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": statistics.median(rates), "device": str(mx.default_device())}


def blas_hint(probe: Dict) -> Optional[str]:
    """How to speed prompts up where the CPU's BLAS is the reference one."""
    if "cpu" not in probe["device"].lower() or probe["gflops"] >= SLOW_BLAS_GFLOPS:
        return None
    return (
        f"prompts: float32 matmul runs at {probe['gflops']:.1f} GFLOP/s here, the speed of "
        "the reference BLAS MLX's Linux wheel bundles; an optimized one makes prompts 10-50x "
        "faster: apt install libopenblas0-pthread, then run with "
        "LD_PRELOAD=libopenblas.so.0 (float32 results then differ "
        "from the reference BLAS's in the last bits)"
    )


# The narrow twin: this architecture with every width cut to TWIN_WIDTH and
# at most TWIN_EXPERTS experts per layer. Same layers, same ops, same
# routing, weights of negligible size.
TWIN_WIDTH = 64
TWIN_EXPERTS = 64


def twin_config(config: dict) -> dict:
    """A Hugging Face config of ``config``'s narrow twin (for large_synthetic)."""

    from .large_synthetic import shrink

    c = dict(_text(config))
    c["model_type"] = STOCK_TYPE_OF.get(c["model_type"], c["model_type"])
    W = TWIN_WIDTH
    c["hidden_size"] = W
    for k in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if c.get(k):
            c[k] = W
    heads, kv_heads = (
        c["num_attention_heads"],
        c.get("num_key_value_heads") or c["num_attention_heads"],
    )
    c["num_attention_heads"], c["num_key_value_heads"] = (
        2,
        (1 if kv_heads < heads else 2),
    )  # GQA stays GQA
    c.pop("head_dim", None)
    if c.get("kv_lora_rank"):  # MLA
        c.update(
            kv_lora_rank=W, qk_nope_head_dim=W // 4, qk_rope_head_dim=W // 4, v_head_dim=W // 2
        )
        if c.get("q_lora_rank"):
            c["q_lora_rank"] = W
    key = "num_experts" if c.get("num_experts") else "n_routed_experts"
    groups = c.get("n_group") or 1
    c[key] = min(c[key], max(TWIN_EXPERTS // groups, 2) * groups)  # whole routing groups
    return shrink(c, vocab_size=256)


def twin_decode_seconds(config: dict, residency: float, tokens: int = 24, warmup: int = 8) -> Dict:
    """Seconds per decoded token of the narrow twin with ``residency`` of its
    experts resident, written, loaded and run by the real code: mlx-lm's
    decode loop, every layer's kernel launches, and when experts are not all
    resident the router's host sync, the store's bookkeeping and each miss's
    disk round trip (its records are read cold). What a token costs besides
    moving weight bytes. The median interval between tokens, as a moment of
    competition for the cores should not decide it."""
    import contextlib
    import io

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .. import load
    from .large_synthetic import generate

    cfg = twin_config(config)
    top_k = cfg["num_experts_per_tok"]
    with tempfile.TemporaryDirectory(prefix="odmoe-doctor-") as tmp:
        with contextlib.redirect_stdout(
            io.StringIO()
        ):  # mlx-lm's quantize prints; --json owns stdout
            path = generate(Path(tmp) / "twin", cfg, progress=False)
        layout = load_layout(path / EXPERTS_DIR)
        E, L = layout.num_experts, len(layout.moe_layers)
        slots = E if residency >= 1 else max(top_k, min(E, round(residency * E)))
        model, _ = load(
            path,
            expert_cache=slots * layout.record_nbytes * L,
            model_config={"odmoe": {"drop_page_cache": True, "warm_start": False}},
        )
        stamps = []
        for _ in generate_step(mx.array(list(range(1, 17))), model, max_tokens=warmup + tokens + 1):
            stamps.append(time.perf_counter())
        dt = statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :]))
        del model
    return {
        "seconds": dt,
        "slots_per_layer": slots,
        "num_experts": E,
        "width": TWIN_WIDTH,
        "record_bytes": layout.record_nbytes,
    }


# -- forecast ---------------------------------------------------------------------


def expected_hit_rate(counts: Dict, slots: int) -> float:
    """Share of routes that went to each layer's ``slots`` most used experts:
    what a frequency-keeping cache of that size would hit on such routing."""
    import numpy as np

    shares = []
    for c in counts.values():
        c = np.sort(np.asarray(c, dtype=np.float64))[::-1]
        if c.sum() > 0:
            shares.append(c[:slots].sum() / c.sum())
    return float(np.mean(shares)) if shares else 0.0


def route_counts(model: Path, sizes: Dict) -> Optional[Dict]:
    """The warm-start counts earlier runs of ``model`` saved, if any."""
    from .. import warm_start

    layout = load_layout(model / EXPERTS_DIR) if (model / EXPERTS_DIR).is_dir() else None
    if layout is None:
        return None
    return warm_start.load_counts(
        warm_start.counts_path(model), layout.moe_layers, layout.num_experts
    )


def forecast(
    sizes: Dict,
    memory: int,
    budget_spec=None,
    context: int = 4096,
    headroom: int = 2**30,
    disk_bps: Optional[float] = None,
    compute_bps: Optional[float] = None,
    fixed_s: Optional[float] = None,
) -> Dict:
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
        budget = max(
            0, min(default_budget(experts, memory), left)
        )  # the loader's rule, for this memory
    slots = slots_that_fit(budget, R, L, E) if R and L else 0
    r = slots / E if E else 0.0
    out = {
        "resident_bytes": resident,
        "expert_bytes": experts,
        "expert_record_bytes": R,
        "moe_layers": L,
        "num_experts": E,
        "top_k": top_k,
        "kv_bytes_per_1k_tokens": kv_tok * 1000,
        "context": context,
        "kv_bytes": kv,
        "memory": memory,
        "headroom": headroom,
        "budget_bytes": budget,
        "min_budget_bytes": minimum,
        "slots_per_layer": int(slots),
        "residency": r,
        "fits_entirely": resident + experts + kv <= memory - headroom,
        "runs": slots >= top_k and resident + slots * R * L + kv <= memory - headroom,
        "memory_use_bytes": resident + int(slots) * R * L + kv,
    }
    if disk_bps and compute_bps and fixed_s is not None and out["runs"]:
        active = resident - sizes.get("embedding_bytes", 0) + top_k * R * L
        h, out["hit_rate_from"] = r, "residency (uniform routing: pessimistic)"
        counts = sizes.get("route_counts")
        if counts and slots < E:
            h = expected_hit_rate(counts, int(slots))
            out["hit_rate_from"] = "earlier runs' routes (warm-start counts)"
        t_compute = active / compute_bps
        t_disk = L * top_k * (1 - h) * R / disk_bps
        out.update(
            active_bytes_per_token=active,
            expected_hit_rate=h,
            t_compute_s=t_compute,
            t_disk_s=t_disk,
            t_fixed_s=fixed_s,
            # The store computes resident experts while misses are read and
            # each miss as it lands: compute and reads overlap.
            tok_s=1.0 / (max(t_compute, t_disk) + fixed_s),
        )
    return out


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report(name: str, f: Dict, probes: Dict) -> str:
    lines = [f"odmoe doctor: {name}", ""]
    lines.append(f"  resident weights      {_gb(f['resident_bytes'])}")
    lines.append(
        f"  routed experts        {_gb(f['expert_bytes'])}  ({f['moe_layers']} MoE layers x "
        f"{f['num_experts']} experts x {_gb(f['expert_record_bytes'])}, top-{f['top_k']})"
    )
    lines.append(
        f"  KV cache              {_gb(f['kv_bytes_per_1k_tokens'])} per 1k tokens; "
        f"{_gb(f['kv_bytes'])} at {f['context']} tokens"
    )
    lines.append(f"  memory                {_gb(f['memory'])} (less {_gb(f['headroom'])} headroom)")
    lines.append("")
    if f["fits_entirely"]:
        lines.append(
            "  fits entirely: every expert can stay resident (no disk reads while decoding)"
        )
    elif f["runs"]:
        lines.append("  does not fit entirely: experts stream from disk through the budget")
    else:
        lines.append(
            f"  does NOT run in this memory: resident weights + KV + the minimum expert budget "
            f"({_gb(f['min_budget_bytes'])}) exceed it"
        )
    lines.append(
        f"  expert budget         {_gb(f['budget_bytes'])} -> {f['slots_per_layer']}/{f['num_experts']} "
        f"experts per layer ({f['residency']:.1%} residency); minimum {_gb(f['min_budget_bytes'])}"
    )
    lines.append(f"  forecast memory use   {_gb(f['memory_use_bytes'])} (resident + budget + KV)")
    if probes.get("disk"):
        d = probes["disk"]
        lines.append(
            f"  disk read             {d['bytes_per_s'] / 1e6:.0f} MB/s ({_gb(d['bytes'])} {d['how']} read of {d['file']})"
        )
    if probes.get("compute"):
        lines.append(
            f"  compute               {probes['compute']['bytes_per_s'] / 1e9:.2f} GB/s of 4-bit weights "
            f"({probes['compute']['device']})"
        )
    if probes.get("matmul"):
        m = probes["matmul"]
        lines.append(f"  prompt matmul         {m['gflops']:.1f} GFLOP/s float32 ({m['device']})")
    if probes.get("twin"):
        t = probes["twin"]
        lines.append(
            f"  fixed costs           {t['seconds'] * 1e3:.1f} ms per token (narrow twin: width {t['width']}, "
            f"{t['slots_per_layer']}/{t['num_experts']} experts resident per layer)"
        )
    if "tok_s" in f:
        lines.append("")
        lines.append(
            f"  per token: {_gb(f['active_bytes_per_token'])} of weights -> {f['t_compute_s'] * 1e3:.1f} ms compute, "
            f"{f['t_fixed_s'] * 1e3:.1f} ms fixed costs, "
            f"{f['t_disk_s'] * 1e3:.1f} ms disk (hit rate ~{f['expected_hit_rate']:.2f}, "
            f"from {f['hit_rate_from']})"
        )
        lines.append(f"  expected decode       {f['tok_s']:.2f} tok/s")
        lines.append(f"  how far to trust it   {TRUST}")
    hint = blas_hint(probes["matmul"]) if probes.get("matmul") else None
    if hint:
        lines.append("")
        lines.append(f"  hint: {hint}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.doctor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", nargs="?", help="odmoe model folder (or a stock mlx-lm MoE checkpoint)."
    )
    p.add_argument(
        "--config",
        help="A Hugging Face config.json of a model not on disk (sizes assume a -q conversion).",
    )
    p.add_argument(
        "--memory",
        help="Memory to plan for: '24GB', '16GiB', bytes. Default: this machine's physical memory.",
    )
    p.add_argument(
        "--budget",
        help="Expert budget to forecast ('8GB', '25%%', 'min'). Default: the loader's default rule.",
    )
    p.add_argument(
        "--context", type=int, default=4096, help="Tokens of KV cache to plan for. Default: 4096"
    )
    p.add_argument(
        "--headroom",
        default="1GiB",
        help="Memory kept free for the OS and activations. Default: 1GiB",
    )
    p.add_argument(
        "--bits", type=int, default=4, help="--config: expert and weight bits. Default: 4"
    )
    p.add_argument(
        "--group-size", type=int, default=64, help="--config: quantization group size. Default: 64"
    )
    p.add_argument(
        "--scale-bytes",
        type=int,
        default=2,
        choices=(2, 4),
        help="--config: bytes per scale/bias (2: float16/bfloat16, 4: float32 as on MLX's CPU). Default: 2",
    )
    p.add_argument(
        "--dtype-bytes",
        type=int,
        default=2,
        choices=(2, 4),
        help="--config: bytes of unquantized weights and the KV cache. Default: 2",
    )
    p.add_argument("--disk-gbps", type=float, help="Disk read GB/s to assume instead of measuring.")
    p.add_argument(
        "--compute-gbps", type=float, help="4-bit weight GB/s to assume instead of measuring."
    )
    p.add_argument(
        "--fixed-ms",
        type=float,
        help="Milliseconds per token besides reading weights (T) to assume instead of "
        "measuring them with the narrow twin.",
    )
    p.add_argument(
        "--probe-mb",
        type=int,
        default=256,
        help="Bytes of the timed disk read, in MB. Default: 256",
    )
    p.add_argument(
        "--no-probe", action="store_true", help="Sizes only: no timed reads, matmuls or decoding."
    )
    p.add_argument("--json", action="store_true", help="Print JSON.")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.config):
        p.error("give a model folder or --config, not both")

    try:
        if args.model:
            sizes = sizes_from_folder(Path(args.model))
            sizes["route_counts"] = route_counts(Path(args.model), sizes)
            check_folder(Path(args.model))
            name = args.model
        else:
            cfg = json.loads(Path(args.config).read_text())
            sizes = sizes_from_config(
                cfg, args.bits, args.group_size, args.scale_bytes, args.dtype_bytes
            )
            name = f"{args.config} (as a {args.bits}-bit, group {args.group_size} conversion)"
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        if args.model:
            print(
                "error: mlx_lm.load would refuse this folder too; no forecast made", file=sys.stderr
            )
        return 2
    memory = parse_budget(args.memory, physical_memory()) if args.memory else physical_memory()
    headroom = parse_budget(args.headroom, memory)

    probes = {}
    if not args.no_probe:
        if args.disk_gbps is None:
            probes["disk"] = disk_bandwidth(sizes["probe_file"], args.probe_mb * 2**20)
        if args.compute_gbps is None:
            probes["compute"] = compute_bandwidth(quantized=sizes.get("experts_quantized", True))
        probes["matmul"] = matmul_gflops()
    disk = args.disk_gbps * 1e9 if args.disk_gbps else (probes.get("disk") or {}).get("bytes_per_s")
    compute = (
        args.compute_gbps * 1e9
        if args.compute_gbps
        else (probes.get("compute") or {}).get("bytes_per_s")
    )
    f = forecast(sizes, memory, args.budget, args.context, headroom, disk, compute)
    fixed = args.fixed_ms / 1e3 if args.fixed_ms is not None else None
    if fixed is None and not args.no_probe and f["runs"]:
        probes["twin"] = twin_decode_seconds(sizes["config"], f["residency"])
        fixed = probes["twin"]["seconds"]
    f = forecast(sizes, memory, args.budget, args.context, headroom, disk, compute, fixed)
    if args.json:
        print(json.dumps({"forecast": f, "probes": probes}, indent=1, default=str))
    else:
        print(report(name, f, probes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
