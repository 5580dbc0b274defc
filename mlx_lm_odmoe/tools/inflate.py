"""mlx_lm_odmoe.inflate: widen a trained model's experts into an I/O-bound testbed.

On a Mac a token's experts compute 10-50x faster than the SSD delivers them;
on a small CPU machine a tiny model is the opposite. This command gives
every routed expert of a converted odmoe folder a wider intermediate axis
(``moe_intermediate_size`` I -> ``--width`` W), so each expert is as big as
a large model's while the model computes what the small one computes:

- gate_proj and up_proj get W - I extra rows of seeded normal values with
  the spread of the expert's real rows (no run of zeros for a disk or a
  compressor to skip);
- the matching down_proj input columns are exactly zero, so the extra units
  add exact zeros to every output.

Logits equal the source's up to float rounding (the sums over the
intermediate axis are longer and blocked differently), so greedy tokens
match. Experts are dequantized (float32 by default, what MLX's CPU gather
kernels take) or, with ``-q``, kept in the source's quantization: the source
bytes are kept and padded in the quantized domain (zero scales and biases
for the extra down_proj columns).

Hidden states are the source's, so everything resident (weights,
tokenizer, a trained shadow.json/shadow.safetensors) is copied. Qwen2-MoE's
shared expert has its own size and stays; deepseek_v3 (Kimi K2) sizes its
shared experts ``moe_intermediate_size * n_shared_experts``, so there the
resident shared expert widens the same way (kept in its quantization), as
in a real Kimi K2, whose shared expert is one routed expert's size.

The experts stream one at a time through the converter's ExpertShardWriter
(memory stays bounded by one expert), into a folder that appears only when
complete.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..conversion.atomic import atomic_dir
from ..conversion.shard_writer import ExpertShardWriter
from ..errors import ConversionError, OdmoeError
from ..layout import EXPERTS_DIR, FORMAT_VERSION, PROJECTIONS
from ..model_types import ODMOE_TYPES
from ..store.readers import ShardedFolderReader
from ..store.records import record_to_arrays

DTYPES = ("float32", "float16", "bfloat16")
_PARTS = ("weight", "scales", "biases")
# Not copied: what describes the source only (its README gives its sizes).
_NOT_COPIED = ("config.json", "README.md", EXPERTS_DIR)


def _dequantize(parts: Dict[str, mx.array], q: Optional[dict]) -> mx.array:
    if q is None:
        return parts["weight"].astype(mx.float32)
    return mx.dequantize(
        parts["weight"],
        parts["scales"],
        parts.get("biases"),
        group_size=q["group_size"],
        bits=q["bits"],
        mode=q.get("mode", "affine"),
    )


def _random_rows(real: mx.array, n: int, rng: np.random.Generator) -> mx.array:
    """``n`` rows of normal values with the spread of ``real``'s rows."""
    std = float(np.std(np.array(real, dtype=np.float32)))
    return mx.array(rng.standard_normal((n, real.shape[1]), dtype=np.float32) * std)


def widen_projection(
    proj: str,
    parts: Dict[str, mx.array],
    extra: int,
    q: Optional[dict],
    rng: np.random.Generator,
    dtype=None,
) -> Dict[str, mx.array]:
    """One projection with ``extra`` more intermediate units.

    ``dtype``: dequantize to it; None keeps the format (a quantized
    projection is padded in the quantized domain, its own bytes unchanged).
    """
    real = _dequantize(parts, q)
    if q is not None and dtype is None:
        return _widen_quantized(proj, parts, real, extra, q, rng)
    if proj == "down_proj":
        wide = mx.concatenate([real, mx.zeros((real.shape[0], extra), real.dtype)], axis=1)
    else:
        wide = mx.concatenate([real, _random_rows(real, extra, rng)], axis=0)
    return {"weight": wide.astype(dtype or parts["weight"].dtype)}


def _widen_quantized(proj, parts, real, extra, q, rng):
    gs, bits, mode = q["group_size"], q["bits"], q.get("mode", "affine")
    if proj == "down_proj":
        # Zero scales and biases: every extra input column dequantizes to 0.
        rows = real.shape[0]
        pad = {
            "weight": mx.zeros((rows, extra * bits // 32), mx.uint32),
            "scales": mx.zeros((rows, extra // gs), parts["scales"].dtype),
            "biases": mx.zeros((rows, extra // gs), parts["scales"].dtype),
        }
        axis = 1
    else:
        w, s, b = mx.quantize(_random_rows(real, extra, rng), gs, bits, mode=mode)
        pad = {
            "weight": w,
            "scales": s.astype(parts["scales"].dtype),
            "biases": b.astype(parts["scales"].dtype),
        }
        axis = 0
    return {k: mx.concatenate([v, pad[k]], axis=axis) for k, v in parts.items()}


def _by_projection(arrays: Dict[str, mx.array]) -> Dict[str, Dict[str, mx.array]]:
    out = {}
    for name, a in arrays.items():
        proj, part = name.split(".")
        out.setdefault(proj, {})[part] = a
    return out


def widen_expert(arrays, extra, q, rng, dtype=None) -> Dict[str, mx.array]:
    """An expert record's arrays ({"gate_proj.weight": ...}) widened."""
    out = {}
    for proj, parts in _by_projection(arrays).items():
        for part, a in widen_projection(proj, parts, extra, q, rng, dtype).items():
            out[f"{proj}.{part}"] = a
    mx.eval(out)
    return out


def _expert_rng(seed: int, layer: int, expert: int) -> np.random.Generator:
    # Per expert, so any one expert's values do not depend on the order written.
    return np.random.default_rng([seed, layer, expert])


# -- checks --------------------------------------------------------------------


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not src.is_dir():
        raise ConversionError(f"--from {src}: no such model folder")
    if not path.exists():
        raise ConversionError(f"{path} not found: --from must be a converted odmoe model folder")
    config = json.loads(path.read_text())
    if config.get("model_type") not in ODMOE_TYPES:
        raise ConversionError(
            f"{path}: model_type {config.get('model_type')!r} is not an odmoe type "
            f"{ODMOE_TYPES}; convert the model with mlx_lm_odmoe.convert first"
        )
    return config


def _shared_is_tied(config: dict) -> bool:
    """deepseek_v3 sizes its shared experts from moe_intermediate_size."""
    return config["model_type"] == "kimi_k2_odmoe" and bool(config.get("n_shared_experts"))


def _check_width(width: int, config: dict, q: Optional[dict], keep_quantized: bool):
    inter = config["moe_intermediate_size"]
    if width < inter:
        raise ConversionError(
            f"--width {width} is smaller than the model's moe_intermediate_size {inter}; "
            f"inflating needs --width >= {inter}"
        )
    groups = []
    if keep_quantized:
        groups.append(("the routed experts (-q keeps their quantization)", q["group_size"]))
    rq = config.get("quantization")
    if _shared_is_tied(config) and rq:
        groups.append(
            ("the shared expert (quantized, widened with the routed ones)", rq["group_size"])
        )
    for what, gs in groups:
        if (width - inter) % gs:
            raise ConversionError(
                f"--width {width}: {what} are quantized in groups of {gs}, so --width minus "
                f"moe_intermediate_size {inter} must be a multiple of {gs}"
            )


# -- the resident part ---------------------------------------------------------


def _quantization_of(config: dict, path: str, weights: dict) -> Optional[dict]:
    """A resident module's quantization, as mlx-lm's load_model reads it."""
    q = config.get("quantization")
    if not q or f"{path}.scales" not in weights:
        return None
    override = q.get(path)  # mlx-lm's per-module quantization
    return override if isinstance(override, dict) else q


def widen_shared_experts(src: Path, out: Path, config: dict, layout, extra: int, seed: int):
    """Rewrite the resident weights with every layer's shared experts widened."""
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise ConversionError(f"{src}: no model*.safetensors files (the resident weights)")
    shards = [mx.load(str(f)) for f in files]
    weights = {k: v for s in shards for k, v in s.items()}
    extra *= config["n_shared_experts"]
    added = 0
    for l in layout.moe_layers:
        prefix = f"model.layers.{l}.mlp.shared_experts"
        rng = _expert_rng(seed, l, layout.num_experts)  # the id after the routed experts
        for proj in PROJECTIONS:
            path = f"{prefix}.{proj}"
            parts = {p: weights[f"{path}.{p}"] for p in _PARTS if f"{path}.{p}" in weights}
            if "weight" not in parts:
                raise ConversionError(f"{src}: no {path}.weight among the resident weights")
            for p, v in widen_projection(
                proj, parts, extra, _quantization_of(config, path, weights), rng
            ).items():
                weights[f"{path}.{p}"] = v
            added += extra * config["hidden_size"]
    for f, shard in zip(files, shards):
        mx.save_safetensors(
            str(out / f.name), {k: weights[k] for k in shard}, metadata={"format": "mlx"}
        )
    index = src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        meta = data.setdefault("metadata", {})
        meta["total_size"] = sum(v.nbytes for v in weights.values())
        if "total_parameters" in meta:
            meta["total_parameters"] += added
        (out / index.name).write_text(json.dumps(data, indent=4))


def _copy_resident(src: Path, out: Path, skip=()):
    for f in sorted(src.iterdir()):
        if f.name in _NOT_COPIED or f.name in skip:
            continue
        if f.is_dir():
            shutil.copytree(f, out / f.name)
        else:
            shutil.copy2(f, out / f.name)


# -- the command ----------------------------------------------------------------


def inflate(
    src,
    out,
    width: int,
    dtype: Optional[str] = "float32",
    keep_quantized: bool = False,
    seed: int = 0,
    shard_size_gb: float = 2.0,
    force: bool = False,
    progress: bool = True,
):
    """Write ``out``: ``src`` with every routed expert ``width`` wide.

    ``dtype``: type of the dequantized experts; ignored with
    ``keep_quantized`` (the source's quantization, padded). Returns the new
    folder's ExpertLayout.
    """
    src, out = Path(src), Path(out)
    config = _read_config(src)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; delete it, pick another OUT or pass --force")
    if dtype not in DTYPES and not keep_quantized:
        raise ConversionError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    reader = ShardedFolderReader(src)
    try:
        source = reader.layout
        q = source.quantization
        if keep_quantized and q is None:
            raise ConversionError(
                f"-q keeps the experts' quantization, but {src}'s experts are "
                "not quantized; drop -q"
            )
        _check_width(width, config, q, keep_quantized)
        extra = width - config["moe_intermediate_size"]
        mx_dtype = None if keep_quantized else getattr(mx, dtype)
        with atomic_dir(out, force=force) as tmp:
            layout = _write_experts(reader, tmp, extra, mx_dtype, seed, shard_size_gb, progress)
            tied = _shared_is_tied(config)
            if tied:
                widen_shared_experts(src, tmp, config, source, extra, seed)
            _copy_resident(src, tmp, skip=_resident_files(src) if tied else ())
            _write_config(tmp, config, src, width, layout, dtype, keep_quantized, seed, tied)
    finally:
        reader.close()
    return layout


def _resident_files(src: Path):
    return [f.name for f in src.glob("model*.safetensors")] + ["model.safetensors.index.json"]


def _write_experts(reader, out, extra, dtype, seed, shard_size_gb, progress):
    source = reader.layout
    q = None if dtype is not None else source.quantization

    def widened(l, e):
        arrays = record_to_arrays(reader.read(l, e), source)
        return widen_expert(arrays, extra, source.quantization, _expert_rng(seed, l, e), dtype)

    layers, E = source.moe_layers, source.num_experts
    first = widened(layers[0], 0)
    writer = ExpertShardWriter(out, first, E, layers, q, int(shard_size_gb * 1e9))
    bar = tqdm(total=E * len(layers), desc="experts", unit="expert", disable=not progress)
    for l in layers:
        for e in range(E):
            writer.add(l, e, first if (l, e) == (layers[0], 0) else widened(l, e))
            bar.update(1)
    bar.close()
    return writer.finish()


def _write_config(out, config, src, width, layout, dtype, keep_quantized, seed, tied):
    from mlx_lm.utils import save_config

    inter = config["moe_intermediate_size"]
    config = dict(config, moe_intermediate_size=width)
    config["odmoe"] = {
        **(config.get("odmoe") or {}),
        "format": FORMAT_VERSION,
        "expert_bytes": layout.record_nbytes,
        "experts_total_bytes": layout.total_nbytes,
        "inflated_from": {
            "model": str(src),
            "moe_intermediate_size": inter,
            "width": width,
            "experts": "quantized like the source" if keep_quantized else dtype,
            "seed": seed,
            "shared_expert": "widened too (its size is tied)" if tied else "unchanged",
            "note": "I/O-bound testbed made by mlx_lm_odmoe.inflate: the extra expert units "
            "add exact zeros, so outputs equal the source model's up to float rounding",
        },
    }
    save_config(config, config_path=out / "config.json")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_lm_odmoe.inflate",
        description=(
            "Make an I/O-bound testbed from a small converted odmoe model: widen every routed "
            "expert's intermediate size to --width (extra gate/up rows of seeded random values, "
            "the matching down_proj columns exactly zero), so each expert is big (e.g. 25 MB) "
            "while the model computes what the small one computes (greedy tokens match; logits "
            "up to float rounding). On a machine where the small model's experts compute faster "
            "than the disk delivers them, this reproduces a Mac running a large MoE model from "
            "its SSD. Resident weights, tokenizer and a trained shadow model are copied."
        ),
        epilog="Example: mlx_lm_odmoe.inflate --from models/tiny-qwen2-moe --width 8192 "
        "--dtype float32 tiny-qwen2-moe-wide  (192 experts of 25 MB: 4.8 GB)",
    )
    p.add_argument("out", metavar="OUT", help="Output folder (must not exist unless --force).")
    p.add_argument(
        "--from",
        dest="src",
        required=True,
        metavar="MODEL",
        help="A converted odmoe model folder (config.json, experts/index.json).",
    )
    p.add_argument(
        "--width",
        type=int,
        required=True,
        help="New moe_intermediate_size of every routed expert (>= the current one). "
        "Record bytes at float32: 3 * width * hidden_size * 4.",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="Type of the dequantized experts. Default: float32 (MLX's CPU gather "
        "kernels are float32-only).",
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="Keep the experts in the source's quantization (e.g. 4-bit), padded in "
        "the quantized domain, instead of dequantizing them.",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the extra rows. Default: 0")
    p.add_argument(
        "--shard-size-gb", type=float, default=2.0, help="Largest expert shard in GB. Default: 2"
    )
    p.add_argument(
        "--gguf",
        metavar="FILE",
        help="Also write the inflated model as a llama.cpp GGUF (qwen2_moe models): the "
        "same weights for racing llama.cpp in the I/O-bound regime.",
    )
    p.add_argument("--force", action="store_true", help="Replace OUT if it exists.")
    return p


def main(argv=None):
    args = configure_parser().parse_args(argv)
    if args.quantize and args.dtype is not None:
        print(
            "error: --dtype is for dequantized experts; -q keeps them quantized, "
            "give one or the other",
            file=sys.stderr,
        )
        return 2
    try:
        layout = inflate(
            args.src,
            args.out,
            args.width,
            dtype=args.dtype or "float32",
            keep_quantized=args.quantize,
            seed=args.seed,
            shard_size_gb=args.shard_size_gb,
            force=args.force,
        )
    except (OdmoeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(
        f"[INFO] Wrote {args.out}: {_size(total)} on disk; "
        f"{layout.num_experts} experts x {len(layout.moe_layers)} layers, "
        f"{_size(layout.record_nbytes)} per expert record ({layout.record_nbytes} bytes)"
    )
    if args.gguf:
        from .large_synthetic import export_gguf

        try:
            print(f"[INFO] Wrote {export_gguf(args.out, args.gguf)}")
        except (ValueError, OSError) as e:
            print(f"error: --gguf: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
